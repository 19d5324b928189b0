//! The i8042's saved state. vm-superio's controller emulates only the reset command and keeps
//! no register, so the state is empty; it has its place in the VM state so that a register
//! added later is saved with the device rather than forgotten.

use super::device::I8042;
use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;

/// The i8042's registers: none (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    type Error = Infallible;

    fn save(&self) -> Result<I8042State, Infallible> {
        Ok(I8042State {})
    }

    fn restore(&mut self, _state: &I8042State) -> Result<(), Infallible> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_state_round_trips() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut a = I8042::new(tx);
        let saved = a.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(json, "{}");
        a.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(a.save().unwrap(), saved);
    }
}
