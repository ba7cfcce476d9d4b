//! Examples for the hip SDK (none yet).
