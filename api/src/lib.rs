//! How both agents talk to the Kubernetes API: the client and its watches, which notice a
//! dead connection on their own (`client`), and the Events they publish (`events`).

pub mod client;
pub mod events;

pub use client::{client, watcher_config, READ_TIMEOUT, WATCH_TIMEOUT};
pub use events::{EventType, Events};
