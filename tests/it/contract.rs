//! The OpenAPI document is the contract: schemathesis (every check, 60 examples per
//! operation) runs against a live walhook's `GET /api/openapi.json` and finds no answer that
//! disagrees with it and no 5xx.

use std::process::Command;

use crate::api::{auth_config, OPERATOR_TOKEN};
use crate::common::Env;
use crate::tools;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_as_its_openapi_document_says() {
    let env = Env::new("contract_fuzz").await;
    // The fuzzer creates many endpoints; the quota's own answer is tested in `api`.
    let wh = env.start(&format!("{}[api]\nmax_endpoints_per_account = 100000\n", auth_config())).await;
    let base = format!("http://127.0.0.1:{}", env.api_port);
    let fuzzer = tools::schemathesis();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        tools::run(
            Command::new(fuzzer)
                .args(["run", &format!("{base}/api/openapi.json"), "--url", &base])
                .args(["--checks", "all", "--max-examples", "60", "--seed", "1"])
                .args(["-H", &format!("Authorization: Bearer {OPERATOR_TOKEN}")])
                .env("NO_COLOR", "1")
                .current_dir(std::env::temp_dir()),
        )
    })
    .await
    .unwrap();
    assert!(ok, "schemathesis found disagreements with docs/openapi.json:\n{out}");
    wh.stop().await.unwrap();
}
