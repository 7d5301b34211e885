//! Publish and subscribe.
//!
//! `macula up` prints a key; then:
//! `MACULA_KEY=sk_live_... cargo run -p macula-client --example pubsub`

use futures_util::StreamExt;
use macula_client::{Client, Payload};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MACULA_URL").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let realm = std::env::var("MACULA_REALM").unwrap_or_else(|_| "com.example.demo".into());
    let key = std::env::var("MACULA_KEY")?;
    let client = Client::connect(&url, &realm, &key).await?;
    let topic = format!("{realm}.greetings");
    let mut events = client.subscribe(&topic).await?;
    // Publisher exclusion is on by default, so a second session publishes.
    let publisher = Client::connect(&url, &realm, &key).await?;
    publisher
        .publish(&topic, Payload::args(vec!["hello, mesh".into()]))
        .await?;
    if let Some(e) = events.next().await {
        println!("received {:?}", e.payload.args);
    }
    client.close().await;
    publisher.close().await;
    Ok(())
}
