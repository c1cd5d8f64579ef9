//! Ferry's operator console: The Elm Architecture over the control API's status snapshots.
//! A model built from snapshots, `update(model, msg)`, a pure `view(model, frame)`.
#![forbid(unsafe_code)]
