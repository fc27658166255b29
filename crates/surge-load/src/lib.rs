//! `surge load`: an open-loop HTTP load generator.
//!
//! A [`Plan`] (target, request mix, load shape, connections) runs through [`run`]; requests
//! are released at their intended times whatever the target does, and latency is measured
//! from those times, so a stall shows in full (no coordinated omission). The [`Report`] holds
//! HDR percentiles, counts per request kind and status, and a per-second timeline, and renders
//! as text, JSON or an SVG plot.

pub mod engine;
pub mod http1;
pub mod mix;
pub mod plot;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;

pub use engine::{preflight, run, Mode, Plan, Run, Target};
pub use scenario::Settings;
pub use stats::Report;
pub use surge_shape::{shape, trace};
