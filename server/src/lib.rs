//! r1-serve library. See ARCHITECTURE.md.
