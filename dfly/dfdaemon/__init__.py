"""dfdaemon: a registry mirror and HTTP(S) proxy that fetches image layers peer-to-peer."""
