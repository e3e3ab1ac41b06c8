//! SoftHSM2 tokens in a private token directory (`SOFTHSM2_CONF`).
