//! The appliance daemon: event loop, control socket, metrics, signals.
