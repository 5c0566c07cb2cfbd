//! The status LED: on while the model generates.
//!
//! Written against `embedded-hal`'s [`OutputPin`]. On Linux, [`FileLed`] drives an LED through
//! a sysfs file: `/sys/class/leds/NAME/brightness` (a Pi's ACT LED) or
//! `/sys/class/gpio/gpioN/value` (an exported GPIO).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use embedded_hal::digital::{ErrorType, OutputPin};

/// No LED.
#[derive(Debug, Default)]
pub struct NoLed;

impl ErrorType for NoLed {
    type Error = core::convert::Infallible;
}

impl OutputPin for NoLed {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// An LED or GPIO behind a sysfs file that takes `1` and `0`.
#[derive(Debug)]
pub struct FileLed {
    path: PathBuf,
}

#[derive(Debug)]
pub struct LedError(pub std::io::Error);

impl embedded_hal::digital::Error for LedError {
    fn kind(&self) -> embedded_hal::digital::ErrorKind {
        embedded_hal::digital::ErrorKind::Other
    }
}

impl FileLed {
    /// Checks that the file can be written, and switches the LED off.
    pub fn open(path: &Path) -> std::io::Result<FileLed> {
        let mut led = FileLed {
            path: path.to_owned(),
        };
        led.write(b"0").map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot drive the status LED through {}: {e}",
                    path.display()
                ),
            )
        })?;
        Ok(led)
    }

    fn write(&mut self, v: &[u8]) -> std::io::Result<()> {
        // No truncation: sysfs files do not take it, and a reader never sees an empty file.
        OpenOptions::new()
            .write(true)
            .open(&self.path)?
            .write_all(v)
    }
}

impl ErrorType for FileLed {
    type Error = LedError;
}

impl OutputPin for FileLed {
    fn set_low(&mut self) -> Result<(), LedError> {
        self.write(b"0").map_err(LedError)
    }
    fn set_high(&mut self) -> Result<(), LedError> {
        self.write(b"1").map_err(LedError)
    }
}
