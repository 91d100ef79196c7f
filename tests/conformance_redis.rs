//! The backend conformance suite against Redis (the server at `LAR_TEST_REDIS_URL`, default
//! redis://127.0.0.1:6379/0), plus the Redis-only interop case with the seed's Python producer.

#[macro_use]
mod conformance;

conformance_suite!(conformance::Kind::Redis);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_python_interop() {
    conformance::scenarios::seed_python_interop(conformance::Kind::Redis).await
}
