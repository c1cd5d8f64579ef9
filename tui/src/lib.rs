//! Ferry's operator console: The Elm Architecture over the control API's status snapshots.
//! A model built from snapshots (`model`), `update(model, msg)` (`update`), a pure
//! `view(model, frame)` (`view`); the runner (`run`) owns the terminal and threads, and the
//! appliance is reached only through the `Appliance` trait (`appliance`).
#![forbid(unsafe_code)]

pub mod appliance;
pub mod fixtures;
pub mod format;
pub mod model;
pub mod run;
pub mod theme;
pub mod update;
pub mod view;

pub use appliance::{Appliance, ApplianceError, SitePair, SocketAppliance};
pub use model::{Model, Options};
pub use run::{run, Exit, RunOptions, TuiError};
pub use theme::{ColorChoice, ColorMode, Theme};
pub use update::{update, Command, Msg};
pub use view::view;
