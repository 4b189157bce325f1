use std::process::ExitCode;

fn main() -> ExitCode {
    // Telemetry settings first: a malformed one is reported even when a
    // router setting (say the required ROUTER_GRPC_TOKEN) is missing too.
    let config = telemetry::Settings::from_env().and_then(|s| Ok((router::Config::from_env()?, s)));
    telemetry::process::run(
        &router::SERVICE,
        config,
        async |config, telemetry, shutdown| {
            router::App::build(config, telemetry)
                .await?
                .run(shutdown)
                .await
        },
    )
}
