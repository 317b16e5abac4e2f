//! Integration tests: the real gateway on 127.0.0.1:0 against real upstream servers.

mod support;

mod admin;
mod config;
mod crm;
mod crm_sim;
mod direct;
mod mariadb;
mod pipeline;
mod proxy;
mod reload;
mod server;
mod smoke;
mod store;
mod systemd;
mod tls;
mod webhook;
mod wordpress;
mod wp_php;
