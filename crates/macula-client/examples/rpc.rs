//! Register a procedure, call it, and stream progressive results.
//!
//! `MACULA_KEY=sk_live_... cargo run -p macula-client --example rpc`

use macula_client::{CallOptions, Client, Payload, Value};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MACULA_URL").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let realm = std::env::var("MACULA_REALM").unwrap_or_else(|_| "com.example.demo".into());
    let key = std::env::var("MACULA_KEY")?;
    let callee = Client::connect(&url, &realm, &key).await?;
    let add = format!("{realm}.add");
    callee
        .register(&add, |inv| async move {
            let sum: i64 = inv.payload.args.iter().filter_map(Value::as_i64).sum();
            Ok(Payload::args(vec![Value::Int(sum)]))
        })
        .await?;
    let count = format!("{realm}.count");
    callee
        .register(&count, |inv| async move {
            for i in 1..=3 {
                inv.progress(Payload::args(vec![Value::Int(i)]));
            }
            Ok(Payload::args(vec!["done".into()]))
        })
        .await?;

    let caller = Client::connect(&url, &realm, &key).await?;
    let r = caller
        .call(&add, Payload::args(vec![Value::Int(2), Value::Int(3)]))
        .await?;
    println!("2 + 3 = {:?}", r.args);
    let mut stream = caller.call_stream(
        &count,
        Payload::default(),
        CallOptions {
            receive_progress: true,
            ..Default::default()
        },
    )?;
    while let Some(answer) = stream.next().await {
        let answer = answer?;
        println!(
            "{} {:?}",
            if answer.progress { "progress" } else { "final" },
            answer.payload.args
        );
    }
    Ok(())
}
