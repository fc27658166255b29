pub mod mix;
pub mod shape;
pub mod trace;
