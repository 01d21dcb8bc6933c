//! The HTTP API (issue 4): not built yet.
