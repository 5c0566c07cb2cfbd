//! A blocking client over any `embedded-io` port: what a microcontroller (or `quill client`)
//! needs to ask for text and read it back.

use embedded_io::{Read, Write};

use crate::frame::{FrameDecoder, FrameError, MAX_FRAME, decode, encode};
use crate::message::{Done, ErrorReport, Generate, Info, Request, Response};

#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ClientError<E> {
    /// The port failed.
    Io(E),
    /// The port reached its end (the server went away).
    Closed,
    /// A frame from the server was damaged; the client is back in step at the next frame.
    Frame(FrameError),
    /// The server refused the request or failed.
    Server(ErrorReport),
    /// The server answered with something else than the request calls for.
    Unexpected(Response),
}

pub struct Client<P> {
    port: P,
    decoder: FrameDecoder<MAX_FRAME>,
    out: [u8; MAX_FRAME],
    /// Bytes read from the port and not yet given to the decoder.
    inbox: [u8; 64],
    inbox_at: usize,
    inbox_len: usize,
}

impl<P: Read + Write> Client<P> {
    pub fn new(port: P) -> Self {
        Client {
            port,
            decoder: FrameDecoder::new(),
            out: [0; MAX_FRAME],
            inbox: [0; 64],
            inbox_at: 0,
            inbox_len: 0,
        }
    }

    pub fn port(&mut self) -> &mut P {
        &mut self.port
    }

    /// Sends one request.
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError<P::Error>> {
        let frame = encode(req, &mut self.out).map_err(ClientError::Frame)?;
        self.port.write_all(frame).map_err(ClientError::Io)?;
        self.port.flush().map_err(ClientError::Io)
    }

    /// Waits for the next response.
    pub fn recv(&mut self) -> Result<Response, ClientError<P::Error>> {
        loop {
            if self.inbox_at == self.inbox_len {
                let n = self.port.read(&mut self.inbox).map_err(ClientError::Io)?;
                if n == 0 {
                    return Err(ClientError::Closed);
                }
                self.inbox_at = 0;
                self.inbox_len = n;
            }
            let byte = self.inbox[self.inbox_at];
            self.inbox_at += 1;
            match self.decoder.push(byte) {
                None => {}
                Some(Ok(payload)) => {
                    return decode(payload, Response::VARIANTS).map_err(ClientError::Frame);
                }
                Some(Err(e)) => return Err(ClientError::Frame(e)),
            }
        }
    }

    /// Sends a ping and waits for its pong (skipping anything else that arrives first).
    pub fn ping(&mut self, nonce: u32) -> Result<(), ClientError<P::Error>> {
        self.send(&Request::Ping { nonce })?;
        loop {
            match self.recv()? {
                Response::Pong { nonce: n } if n == nonce => return Ok(()),
                Response::Error(e) => return Err(ClientError::Server(e)),
                _ => {}
            }
        }
    }

    pub fn info(&mut self) -> Result<Info, ClientError<P::Error>> {
        self.send(&Request::Info)?;
        match self.recv()? {
            Response::Info(i) => Ok(i),
            Response::Error(e) => Err(ClientError::Server(e)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Starts a generation and hands each piece of text to `on_text` until it is done.
    /// `on_text` returns false to cancel; the server then ends with [`crate::Finish::Cancelled`].
    pub fn generate(
        &mut self,
        req: Generate,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Done, ClientError<P::Error>> {
        let id = req.id;
        self.send(&Request::Generate(req))?;
        let mut cancelled = false;
        loop {
            match self.recv()? {
                // After a cancel, text still in flight is dropped.
                Response::Token { id: i, text } if i == id && !cancelled && !on_text(&text) => {
                    cancelled = true;
                    self.send(&Request::Cancel { id })?;
                }
                Response::Done(d) if d.id == id => return Ok(d),
                Response::Error(e) if e.id == Some(id) || e.id.is_none() => {
                    return Err(ClientError::Server(e));
                }
                // Left over from an earlier request.
                _ => {}
            }
        }
    }
}
