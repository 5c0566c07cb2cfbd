//! A microcontroller asking quill for text over its UART, with only `core`.
//!
//! Build (no board needed; this proves the protocol crate needs no `std`):
//!
//! ```text
//! rustup target add thumbv7em-none-eabihf
//! cargo build --release -p quill-protocol --example mcu_client --target thumbv7em-none-eabihf
//! ```
//!
//! The UART here is a memory-mapped data/status register pair, as on most Cortex-M parts; a real
//! firmware would take the UART from its HAL instead (anything implementing `embedded-io`).

// On a microcontroller there is no `std` and no `main`; on the host (`cargo test` builds every
// example) it is an ordinary program that does nothing.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::ptr::{read_volatile, write_volatile};

use quill_protocol::{Client, Finish, Generate, Sampling, truncated};

/// A UART with a status register (bit 0: a byte arrived, bit 1: room to send) and a data register.
struct Uart {
    base: usize,
}

#[derive(Debug)]
struct UartError;

impl embedded_io::Error for UartError {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = UartError;
}

impl Uart {
    fn status(&self) -> u32 {
        // SAFETY: `base` is the UART's register block on this (example) part.
        unsafe { read_volatile(self.base as *const u32) }
    }
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, UartError> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.status() & 1 == 0 {}
        // SAFETY: the data register sits one word after the status register.
        buf[0] = unsafe { read_volatile((self.base + 4) as *const u32) } as u8;
        Ok(1)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, UartError> {
        for &b in buf {
            while self.status() & 2 == 0 {}
            // SAFETY: as in `read`.
            unsafe { write_volatile((self.base + 4) as *mut u32, b as u32) };
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), UartError> {
        Ok(())
    }
}

/// Asks for a short completion and counts the bytes of text that come back.
#[unsafe(no_mangle)]
pub extern "C" fn quill_ask() -> u32 {
    let mut client = Client::new(Uart { base: 0x4000_c000 });
    if client.ping(1).is_err() {
        return 0;
    }
    let request = Generate {
        id: 1,
        prompt: truncated("The panel's status is"),
        chat: false,
        sampling: Sampling {
            max_tokens: Some(16),
            temperature: Some(0.0),
            ..Sampling::default()
        },
    };
    let mut received = 0u32;
    match client.generate(request, |text| {
        received += text.len() as u32;
        true
    }) {
        Ok(done) if done.finish != Finish::Cancelled => received,
        _ => 0,
    }
}

/// The entry point the linker looks for (a real firmware's runtime crate provides its own).
#[cfg(target_os = "none")]
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    quill_ask();
    loop {}
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_os = "none"))]
fn main() {
    // Only referenced, not run: the register block exists on the microcontroller only.
    let _ = quill_ask as extern "C" fn() -> u32;
}
