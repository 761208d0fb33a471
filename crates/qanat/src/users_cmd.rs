//! `qanat users add|delete|list`: SCRAM credentials in a stopped broker's data directory
//! (`scram-credentials.json`, see `qanat_broker::credentials`). Passwords are read from a file
//! or the environment, never from the command line, and only derived keys are written.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use qanat_broker::credentials::CredentialStore;
use qanat_broker::scram::{ScramCredential, ScramMechanism, MAX_ITERATIONS, MIN_ITERATIONS};

#[derive(Args)]
pub struct UsersArgs {
    /// Data directory of the (stopped) broker.
    #[arg(long, env = "QANAT_DATA_DIR", default_value = "./qanat-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Add a user, or replace its credentials.
    Add {
        name: String,
        /// SCRAM-SHA-256 or SCRAM-SHA-512; both when not given.
        #[arg(long)]
        mechanism: Vec<String>,
        /// File whose first line is the password.
        #[arg(long, conflicts_with = "password_env")]
        password_file: Option<PathBuf>,
        /// Environment variable holding the password.
        #[arg(long, default_value = "QANAT_USER_PASSWORD")]
        password_env: String,
        #[arg(long, default_value_t = 8192)]
        iterations: u32,
    },
    /// Delete a user (all mechanisms, or the ones given).
    Delete {
        name: String,
        #[arg(long)]
        mechanism: Vec<String>,
    },
    /// List users and their mechanisms.
    List,
}

fn mechanisms(names: &[String]) -> anyhow::Result<Vec<ScramMechanism>> {
    if names.is_empty() {
        return Ok(ScramMechanism::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            ScramMechanism::from_name(n)
                .with_context(|| format!("--mechanism {n:?}: use SCRAM-SHA-256 or SCRAM-SHA-512"))
        })
        .collect()
}

fn read_password(file: Option<&PathBuf>, env: &str) -> anyhow::Result<String> {
    let password = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the password from {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => std::env::var(env)
            .with_context(|| format!("no --password-file and ${env} is not set"))?,
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password)
}

pub async fn run(args: UsersArgs) -> anyhow::Result<()> {
    let store = CredentialStore::open(&args.data_dir)
        .with_context(|| format!("opening credentials in {}", args.data_dir.display()))?;
    match args.action {
        Action::Add {
            name,
            mechanism,
            password_file,
            password_env,
            iterations,
        } => {
            if name.is_empty() {
                bail!("the user name is empty");
            }
            if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
                bail!("--iterations must be within {MIN_ITERATIONS}..={MAX_ITERATIONS}");
            }
            let password = read_password(password_file.as_ref(), &password_env)?;
            let changes = mechanisms(&mechanism)?
                .into_iter()
                .map(|m| {
                    ScramCredential::new(m, password.as_bytes(), iterations)
                        .map(|c| (name.clone(), m, c))
                })
                .collect::<Result<Vec<_>, _>>()?;
            store.upsert(changes)?;
            println!("user {name} saved");
        }
        Action::Delete { name, mechanism } => {
            let removals = if mechanism.is_empty() {
                vec![(name.clone(), None)]
            } else {
                mechanisms(&mechanism)?
                    .into_iter()
                    .map(|m| (name.clone(), Some(m)))
                    .collect()
            };
            if !store.delete(removals)?.into_iter().any(|found| found) {
                bail!("no such user or mechanism: {name}");
            }
            println!("user {name} deleted");
        }
        Action::List => {
            for (user, creds) in store.list() {
                let creds: Vec<String> = creds
                    .iter()
                    .map(|(m, i)| format!("{}(iterations={i})", m.name()))
                    .collect();
                println!("{user}\t{}", creds.join(","));
            }
        }
    }
    Ok(())
}
