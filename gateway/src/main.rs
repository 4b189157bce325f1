use std::process::ExitCode;

fn main() -> ExitCode {
    let config =
        gateway::Config::from_env().and_then(|c| Ok((c, telemetry::Settings::from_env()?)));
    telemetry::process::run(
        &gateway::SERVICE,
        config,
        async |config, telemetry, shutdown| {
            let app = gateway::App::build(config, telemetry).await?;
            app.run(shutdown, telemetry.health.clone()).await
        },
    )
}
