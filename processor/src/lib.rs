//! The engine (issue 3): not built yet.
