//! Autoscaling as pure functions: a [`Policy`] sees [`Signals`] (one pool's load at an instant)
//! and answers how many instances the pool should run. No I/O and no clock: time is a field of
//! the signals, so the same policy runs live (sampled every second by the pool supervisor) and
//! in virtual time in the simulator.

pub mod baselines;
pub mod plot;
mod policy;
pub mod scale_in;
pub mod sim;
pub mod suite;

pub use policy::{Decision, Metric, Policy, ScaleConfig, Signals, SurgePolicy};
