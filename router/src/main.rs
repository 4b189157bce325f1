use std::process::ExitCode;

fn main() -> ExitCode {
    let config = router::Config::from_env().and_then(|c| Ok((c, telemetry::Settings::from_env()?)));
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
