use std::process::ExitCode;

fn main() -> ExitCode {
    let config = worker::Config::from_env().and_then(|c| Ok((c, telemetry::Settings::from_env()?)));
    telemetry::process::run(
        &worker::SERVICE,
        config,
        async |config, telemetry, shutdown| {
            worker::App::build(config, telemetry)
                .await?
                .run(shutdown)
                .await
        },
    )
}
