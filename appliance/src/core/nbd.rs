//! NBD protocol codec (sans-IO): handshake, option haggling, requests and replies.
