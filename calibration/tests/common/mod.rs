//! Shared test support: tiny models and an independent interpreter.
pub mod eval;
pub mod models;
