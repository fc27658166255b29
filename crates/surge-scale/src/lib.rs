//! Autoscaling as pure functions: a [`Policy`] sees [`Signals`] (one pool's load at an instant)
//! and answers how many instances the pool should run. No I/O and no clock: time is passed in,
//! so the same code runs live and in virtual time in the simulator. Shared by both: what the
//! data path records ([`load`]), the sampling loop that turns it into signals ([`autoscaler`]),
//! the policy, and the choice of instances to stop ([`scale_in`]).

pub mod autoscaler;
pub mod baselines;
pub mod load;
pub mod plot;
mod policy;
pub mod scale_in;
pub mod sim;
pub mod suite;

pub use policy::{Decision, Metric, Policy, ScaleConfig, Signals, SurgePolicy};
