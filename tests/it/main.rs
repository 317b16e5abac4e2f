//! Integration tests: the real gateway on 127.0.0.1:0 against real upstream servers.

mod support;

mod config;
mod proxy;
mod server;
mod smoke;
mod webhook;
