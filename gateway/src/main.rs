use std::process::ExitCode;

fn main() -> ExitCode {
    let config = gateway::Config::from_env().and_then(|config| {
        let mut settings = telemetry::Settings::from_env()?;
        // The configured tenants are the known `tenant_id` label values.
        settings
            .cardinality
            .known_tenants
            .extend(config.api_keys.tenants().map(ToString::to_string));
        Ok((config, settings))
    });
    telemetry::process::run(
        &gateway::SERVICE,
        config,
        async |config, telemetry, shutdown| {
            let app = gateway::App::build(config, telemetry).await?;
            app.run(shutdown, telemetry.health.clone()).await
        },
    )
}
