//! Load shapes and the arrivals they make, and recorded request traces. Pure functions of time
//! and a seed, shared by the load generator (`surge load`) and the autoscaling simulator
//! (`surge sim`), so a scenario means the same thing live and in virtual time.

pub mod shape;
pub mod trace;

pub use shape::{Schedule, Shape};
