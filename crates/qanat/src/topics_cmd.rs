//! `qanat topics`: topic administration through librdkafka, so it works against the Qanat
//! broker and any Kafka cluster alike.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// `--bootstrap`, shared by the administration commands.
#[derive(Args)]
pub struct Bootstrap {
    /// Broker address, HOST:PORT (a comma-separated list for a cluster).
    #[arg(
        long = "bootstrap",
        value_name = "HOST:PORT",
        global = true,
        env = "QANAT_BOOTSTRAP",
        default_value = "127.0.0.1:9092"
    )]
    pub addr: String,
    #[command(flatten)]
    pub security: crate::kafka_security::SecurityArgs,
}

#[derive(Args)]
pub struct TopicsArgs {
    #[command(flatten)]
    bootstrap: Bootstrap,
    #[command(subcommand)]
    command: TopicsCommand,
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
    },
    /// List topic names.
    List,
    /// Show partitions with their earliest and latest offsets.
    Describe {
        /// Only this topic (all topics when absent).
        name: Option<String>,
    },
    /// Grow a topic to a larger partition count.
    Alter {
        name: String,
        #[arg(long)]
        partitions: usize,
    },
    /// Delete a topic and its data.
    Delete { name: String },
}

pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("socket.timeout.ms", "30000");
    crate::kafka_security::apply(&mut c);
    c
}

pub(crate) fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    client_config(bootstrap)
        .create()
        .context("creating the admin client")
}

pub(crate) fn check(
    results: Vec<Result<String, (String, rdkafka::types::RDKafkaErrorCode)>>,
    verb: &str,
) -> anyhow::Result<()> {
    let total = results.len();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(name) => println!("{verb} {name}"),
            Err((name, code)) => {
                eprintln!("error: {name}: {code}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} failed");
    }
    Ok(())
}

pub async fn run(args: TopicsArgs) -> anyhow::Result<()> {
    args.bootstrap.security.install()?;
    crate::kafka_security::check_login(&args.bootstrap.addr).await?;
    let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    match args.command {
        TopicsCommand::Create {
            name,
            partitions,
            replication_factor,
        } => {
            let topic = NewTopic::new(
                &name,
                partitions,
                TopicReplication::Fixed(replication_factor),
            );
            let results = admin(&args.bootstrap.addr)?
                .create_topics([&topic], &opts)
                .await
                .context("CreateTopics")?;
            check(results, "created topic")
        }
        TopicsCommand::Delete { name } => {
            let results = admin(&args.bootstrap.addr)?
                .delete_topics(&[&name], &opts)
                .await
                .context("DeleteTopics")?;
            check(results, "deleted topic")
        }
        TopicsCommand::Alter { name, partitions } => {
            let grow = NewPartitions::new(&name, partitions);
            let results = admin(&args.bootstrap.addr)?
                .create_partitions([&grow], &opts)
                .await
                .context("CreatePartitions")?;
            check(results, "altered topic")
        }
        TopicsCommand::List => {
            let bootstrap = args.bootstrap.addr.clone();
            let names = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
                let consumer = consumer(&bootstrap, "qanat-topics")?;
                let md = consumer
                    .fetch_metadata(None, TIMEOUT)
                    .context("fetching metadata")?;
                Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
            })
            .await??;
            for n in names {
                println!("{n}");
            }
            Ok(())
        }
        TopicsCommand::Describe { name } => {
            let bootstrap = args.bootstrap.addr.clone();
            let text = tokio::task::spawn_blocking(move || describe(&bootstrap, name.as_deref()))
                .await??;
            print!("{text}");
            Ok(())
        }
    }
}

pub(crate) fn consumer(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the metadata client")
}

fn describe(bootstrap: &str, name: Option<&str>) -> anyhow::Result<String> {
    let consumer = consumer(bootstrap, "qanat-topics")?;
    let md = consumer
        .fetch_metadata(name, TIMEOUT)
        .context("fetching metadata")?;
    let mut out = String::new();
    for topic in md.topics() {
        if let Some(err) = topic.error() {
            bail!("topic {}: {:?}", topic.name(), err);
        }
        out.push_str(&format!(
            "topic {}\tpartitions {}\n",
            topic.name(),
            topic.partitions().len()
        ));
        for p in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic.name(), p.id(), TIMEOUT)
                .with_context(|| format!("offsets of {}-{}", topic.name(), p.id()))?;
            out.push_str(&format!(
                "  partition {}\tleader {}\tearliest {}\tlatest {}\n",
                p.id(),
                p.leader(),
                low,
                high
            ));
        }
    }
    Ok(out)
}
