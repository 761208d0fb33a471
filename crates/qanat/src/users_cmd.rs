//! `qanat users add|delete|list`: SCRAM credentials in a stopped broker's data directory
//! (`scram-credentials.json`, see `qanat_broker::credentials`), or, with `--bootstrap`, on a
//! running broker through DescribeUserScramCredentials/AlterUserScramCredentials (as Kafka's
//! `kafka-configs --entity-type users` does; it needs Alter, or Describe, on the cluster when
//! the authorizer is on). Passwords are read from a file or the environment, never from the
//! command line; the password is salted and hashed here, and only derived keys are stored.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kafka_protocol::messages::alter_user_scram_credentials_request::{
    ScramCredentialDeletion, ScramCredentialUpsertion,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse, ApiKey,
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse,
};
use qanat_broker::credentials::CredentialStore;
use qanat_broker::scram::{ScramCredential, ScramMechanism, MAX_ITERATIONS, MIN_ITERATIONS};
use rand::RngCore;

use crate::admin::{error_text, s, AdminConn};

#[derive(Args)]
pub struct UsersArgs {
    /// Data directory of the (stopped) broker.
    #[arg(
        long,
        env = "QANAT_DATA_DIR",
        default_value = "./qanat-data",
        conflicts_with = "bootstrap"
    )]
    data_dir: PathBuf,
    /// A running broker, HOST:PORT, instead of a data directory.
    #[arg(long, value_name = "HOST:PORT")]
    bootstrap: Option<String>,
    /// How to reach a secured listener with --bootstrap.
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
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
    // Offline, the data directory's lock is held until the edit is done.
    let (_lock, store): (_, Box<dyn UserStore>) = match &args.bootstrap {
        Some(addr) => (
            None,
            Box::new(AdminConn::connect(addr, "qanat-users", &args.security)?),
        ),
        None => {
            let lock = crate::admin::lock_data_dir(&args.data_dir)?;
            let store = CredentialStore::open(&args.data_dir)
                .with_context(|| format!("opening credentials in {}", args.data_dir.display()))?;
            (lock, Box::new(store))
        }
    };
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
                    let mut salt = vec![0u8; SALT_BYTES];
                    rand::rng().fill_bytes(&mut salt);
                    let salted = m.salted_password(password.as_bytes(), &salt, iterations);
                    Upsert {
                        name: name.clone(),
                        mechanism: m,
                        salt,
                        salted,
                        iterations,
                    }
                })
                .collect();
            store.upsert(changes)?;
            println!("user {name} saved");
        }
        Action::Delete { name, mechanism } => {
            let mechanisms = if mechanism.is_empty() {
                None
            } else {
                Some(mechanisms(&mechanism)?)
            };
            if !store.delete(&name, mechanisms)? {
                bail!("no such user or mechanism: {name}");
            }
            println!("user {name} deleted");
        }
        Action::List => {
            for (user, creds) in store.list()? {
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

/// Salt length of a new credential, as the broker's own.
const SALT_BYTES: usize = 32;

/// A credential to store: the password already salted and hashed (SaltedPassword).
struct Upsert {
    name: String,
    mechanism: ScramMechanism,
    salt: Vec<u8>,
    salted: Vec<u8>,
    iterations: u32,
}

/// Users and the (mechanism, iterations) of each of their credentials.
type UserList = Vec<(String, Vec<(ScramMechanism, u32)>)>;

/// Where the credentials are: a data directory or a running broker.
trait UserStore {
    fn upsert(&self, changes: Vec<Upsert>) -> anyhow::Result<()>;
    /// Delete the user's credentials of `mechanisms` (all when `None`); whether any existed.
    fn delete(&self, name: &str, mechanisms: Option<Vec<ScramMechanism>>) -> anyhow::Result<bool>;
    fn list(&self) -> anyhow::Result<UserList>;
}

impl UserStore for CredentialStore {
    fn upsert(&self, changes: Vec<Upsert>) -> anyhow::Result<()> {
        let changes = changes
            .into_iter()
            .map(|u| {
                let credential = ScramCredential::from_salted_password(
                    u.mechanism,
                    &u.salted,
                    u.salt,
                    u.iterations,
                );
                (u.name, u.mechanism, credential)
            })
            .collect();
        Ok(CredentialStore::upsert(self, changes)?)
    }

    fn delete(&self, name: &str, mechanisms: Option<Vec<ScramMechanism>>) -> anyhow::Result<bool> {
        let removals = match mechanisms {
            None => vec![(name.to_string(), None)],
            Some(ms) => ms
                .into_iter()
                .map(|m| (name.to_string(), Some(m)))
                .collect(),
        };
        Ok(CredentialStore::delete(self, removals)?
            .into_iter()
            .any(|found| found))
    }

    fn list(&self) -> anyhow::Result<UserList> {
        Ok(CredentialStore::list(self))
    }
}

/// Kafka's code for "no such credential".
const RESOURCE_NOT_FOUND: i16 = 91;

impl AdminConn {
    /// AlterUserScramCredentials; the per-user errors that are not `tolerated`, as one error.
    fn alter_users(
        &self,
        req: AlterUserScramCredentialsRequest,
        tolerated: &[i16],
    ) -> anyhow::Result<Vec<i16>> {
        let resp: AlterUserScramCredentialsResponse =
            self.call(ApiKey::AlterUserScramCredentials, 0..=0, &req)?;
        let failed: Vec<String> = resp
            .results
            .iter()
            .filter(|r| r.error_code != 0 && !tolerated.contains(&r.error_code))
            .map(|r| {
                format!(
                    "{}: {}",
                    r.user.as_str(),
                    error_text(r.error_code, r.error_message.as_ref())
                )
            })
            .collect();
        if !failed.is_empty() {
            bail!("changing users: {}", failed.join("; "));
        }
        Ok(resp.results.iter().map(|r| r.error_code).collect())
    }
}

impl UserStore for AdminConn {
    fn upsert(&self, changes: Vec<Upsert>) -> anyhow::Result<()> {
        let req = AlterUserScramCredentialsRequest::default().with_upsertions(
            changes
                .into_iter()
                .map(|u| {
                    ScramCredentialUpsertion::default()
                        .with_name(s(&u.name))
                        .with_mechanism(u.mechanism.kafka_code())
                        .with_iterations(i32::try_from(u.iterations).unwrap_or(i32::MAX))
                        .with_salt(u.salt.into())
                        .with_salted_password(u.salted.into())
                })
                .collect(),
        );
        self.alter_users(req, &[]).map(drop)
    }

    fn delete(&self, name: &str, mechanisms: Option<Vec<ScramMechanism>>) -> anyhow::Result<bool> {
        // A deletion names one mechanism: all of them, where none was given.
        let mechanisms = mechanisms.unwrap_or_else(|| ScramMechanism::ALL.to_vec());
        let req = AlterUserScramCredentialsRequest::default().with_deletions(
            mechanisms
                .into_iter()
                .map(|m| {
                    ScramCredentialDeletion::default()
                        .with_name(s(name))
                        .with_mechanism(m.kafka_code())
                })
                .collect(),
        );
        let codes = self.alter_users(req, &[RESOURCE_NOT_FOUND])?;
        Ok(codes.contains(&0))
    }

    fn list(&self) -> anyhow::Result<UserList> {
        let resp: DescribeUserScramCredentialsResponse = self.call(
            ApiKey::DescribeUserScramCredentials,
            0..=0,
            &DescribeUserScramCredentialsRequest::default().with_users(None),
        )?;
        if resp.error_code != 0 {
            bail!(
                "describing users: {}",
                error_text(resp.error_code, resp.error_message.as_ref())
            );
        }
        let mut users = Vec::new();
        for r in resp.results {
            if r.error_code != 0 {
                bail!(
                    "describing user {}: {}",
                    r.user.as_str(),
                    error_text(r.error_code, r.error_message.as_ref())
                );
            }
            let creds = r
                .credential_infos
                .iter()
                .map(|c| {
                    let m = ScramMechanism::from_kafka_code(c.mechanism).with_context(|| {
                        format!(
                            "user {}: unknown mechanism {}",
                            r.user.as_str(),
                            c.mechanism
                        )
                    })?;
                    Ok((m, u32::try_from(c.iterations).unwrap_or_default()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            users.push((r.user.to_string(), creds));
        }
        users.sort();
        Ok(users)
    }
}
