//! Datastore (being written).
