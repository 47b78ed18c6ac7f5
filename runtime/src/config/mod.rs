//! The TOML configuration (docs/design.md#8-configuration): `[runtime]`, `[[dictionary]]`,
//! `[[monitor]]`, `[[profile]]` with `[[profile.steer]]` rules. Errors name the file, the line and
//! the key.

mod defaults;
mod file;
mod load;
mod monitor;
mod policy;
mod requests;
mod steer;

pub use file::{Config, DictionaryConfig, RuntimeConfig, VectorConfig};
pub(crate) use load::locate_key;
pub use monitor::{Action, Aggregate, ApplyTo, MonitorConfig, Window};
pub use policy::{OnFailure, PolicyConfig};
pub use requests::{RequestDictionary, RequestsConfig};
pub use steer::{Op, Overrides, ProfileConfig, SteerConfig};
