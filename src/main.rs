//! The `strom` command: `strom serve` (the default) runs the broker.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use strom::config::{self, BrokerConfig, ServeOptions};
use strom::shard::startup;

#[global_allocator]
static ALLOC: strom::alloc::GuardedAlloc = strom::alloc::GuardedAlloc;

#[derive(Parser)]
#[command(
    name = "strom",
    version,
    about = "A thread-per-core Kafka-compatible event streaming broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Check whether this machine is ready for strom (io_uring, memlock, O_DIRECT, CPU, limits).
    Tune {
        /// The data directory to check for O_DIRECT.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Cores to plan for (as `serve --cores`); default: every online core.
        #[arg(long)]
        cores: Option<String>,
    },
    /// Load-test any Kafka-compatible broker with an OpenMessaging-style workload.
    Bench(BenchArgs),
    /// Send one record per line of standard input to a topic of any Kafka-compatible cluster.
    Produce {
        topic: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// Split each line into key and value at the first SEP (no SEP: no key).
        #[arg(long, value_name = "SEP")]
        key_separator: Option<String>,
        /// A header added to every record; repeatable.
        #[arg(long = "header", value_name = "KEY=VALUE")]
        headers: Vec<String>,
        /// Send every record to this partition (default: by key, round-robin without one).
        #[arg(long)]
        partition: Option<i32>,
        /// all, 1 or 0.
        #[arg(long, default_value = "all")]
        acks: String,
        /// none, gzip, snappy, lz4 or zstd.
        #[arg(long, default_value = "none")]
        compression: String,
    },
    /// Print the records of a topic of any Kafka-compatible cluster.
    Consume {
        topic: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// beginning, end, OFFSET (negative: that many before the end) or @TIMESTAMP_MS; with
        /// --group, only for partitions the group has no committed offset for.
        #[arg(long, default_value = "beginning", allow_hyphen_values = true)]
        from: String,
        /// Consume as a member of this consumer group (sharing partitions, committing offsets).
        #[arg(long)]
        group: Option<String>,
        /// Stop after this many records.
        #[arg(long)]
        num: Option<u64>,
        /// kcat's format: %k key, %v value, %p partition, %o offset, %T timestamp (ms),
        /// %h headers (k=v,...), and \\n \\t escapes.
        #[arg(long, default_value = "%v\\n")]
        format: String,
    },
    /// Topics of any Kafka-compatible cluster.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Consumer groups of any Kafka-compatible cluster.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Transactions of any Kafka-compatible cluster (as kafka-transactions.sh).
    Transactions {
        #[command(subcommand)]
        command: TransactionsCommand,
    },
    /// The brokers and partition health of a cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Brokers (live or not), the controller, leaders per broker, under-replicated and offline
    /// partitions.
    Status {
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Spread replicas and leaders evenly over the live brokers (AlterPartitionReassignments)
    /// and wait until the moves are done.
    Rebalance {
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// How long to wait for the moves, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication_factor: i16,
        /// A topic config, such as `retention.ms=60000`; repeatable.
        #[arg(long = "config", value_name = "NAME=VALUE")]
        configs: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// List topic names.
    List {
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Partitions, leaders, replicas and config overrides of a topic.
    Describe {
        name: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Set or delete topic config overrides.
    Alter {
        name: String,
        #[arg(long = "config", value_name = "NAME=VALUE")]
        configs: Vec<String>,
        #[arg(long = "delete-config", value_name = "NAME")]
        delete_configs: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Delete a topic.
    Delete {
        name: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Grow a topic to a new partition count.
    AddPartitions {
        name: String,
        #[arg(long)]
        partitions: i32,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// List every group with its state.
    List {
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Members, assignments, committed offsets and lag per partition of one group.
    Describe {
        group: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Move a share group's start offsets (the group must have no members). Prints the plan;
    /// applies it with --execute.
    #[command(group(clap::ArgGroup::new("to").required(true)))]
    ResetOffsets {
        group: String,
        /// `TOPIC` (every partition) or `TOPIC:P,P,...`; repeatable.
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// The log start offset of each partition.
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// The log end offset of each partition: only records written from now on are read.
        #[arg(long, group = "to")]
        to_latest: bool,
        #[arg(long, group = "to", value_name = "OFFSET")]
        to_offset: Option<i64>,
        #[arg(long)]
        execute: bool,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// Forget a share group's offsets for whole topics (the group must have no members): its next
    /// consumer starts them at `share.auto.offset.reset`.
    DeleteOffsets {
        group: String,
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
}

#[derive(Subcommand)]
enum TransactionsCommand {
    /// Every transactional id with its coordinator, producer id and state.
    List {
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
    /// The state, producer, timeout, age and partitions of one transactional id.
    Describe {
        #[arg(long = "transactional-id")]
        transactional_id: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap: String,
    },
}

#[derive(Parser)]
struct ServeArgs {
    /// Address to accept Kafka clients on (port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// Address of the admin HTTP port: Prometheus `/metrics` and `/v1/status`.
    #[arg(long, default_value = "127.0.0.1:9644")]
    admin_listen: SocketAddr,
    /// Where partitions and metadata are stored.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Cores to run one shard each on, such as `0-1` or `0,2`; default: every online core.
    #[arg(long)]
    cores: Option<String>,
    /// A core-mapping profile from `tuning/` (`cores = "0-1"` or `"all"`); `--cores` wins.
    #[arg(long)]
    tuning: Option<PathBuf>,
    /// Broker settings file (TOML, Kafka setting names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A broker setting with its Kafka name, such as `log.retention.hours=24`; repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Group { command }) => group(command),
        Some(Command::Topic { command }) => topic(command),
        Some(Command::Transactions { command }) => {
            let out = match command {
                TransactionsCommand::List { bootstrap } => {
                    strom::client::transactions::list(&bootstrap)
                }
                TransactionsCommand::Describe {
                    transactional_id,
                    bootstrap,
                } => strom::client::transactions::describe(&bootstrap, &transactional_id),
            };
            out.map(|out| print!("{out}"))
        }
        Some(Command::Cluster {
            command: ClusterCommand::Status { bootstrap },
        }) => strom::client::status::status(&bootstrap).map(|out| print!("{out}")),
        Some(Command::Cluster {
            command: ClusterCommand::Rebalance { bootstrap, timeout },
        }) => {
            strom::client::rebalance::rebalance(&bootstrap, std::time::Duration::from_secs(timeout))
                .map(|out| print!("{out}"))
        }
        Some(Command::Produce {
            topic,
            bootstrap,
            key_separator,
            headers,
            partition,
            acks,
            compression,
        }) => produce(
            topic,
            bootstrap,
            key_separator,
            &headers,
            partition,
            &acks,
            &compression,
        ),
        Some(Command::Consume {
            topic,
            bootstrap,
            from,
            group,
            num,
            format,
        }) => consume(topic, bootstrap, &from, group, num, format),
        Some(Command::Tune { data_dir, cores }) => tune(&data_dir, cores.as_deref()),
        Some(Command::Bench(args)) => bench(args),
        None => serve(ServeArgs::parse_from(["serve"])),
    };
    if let Err(e) = result {
        eprintln!("strom: {e:#}");
        std::process::exit(1);
    }
}

fn tune(data_dir: &std::path::Path, cores: Option<&str>) -> Result<()> {
    let requested = cores.map(config::parse_core_list).transpose()?;
    let shards = startup::resolve_cores(requested)?.len();
    let (report, runnable) = strom::tune::report(data_dir, shards);
    print!("{report}");
    if !runnable {
        std::process::exit(2);
    }
    Ok(())
}

/// `strom bench`'s options.
#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Workload TOML, such as benches/workloads/1-topic-16-partitions-1kb.toml.
    #[arg(long)]
    workload: PathBuf,
    /// Measured duration, overriding the workload's `duration_s`.
    #[arg(long)]
    duration_s: Option<u64>,
    /// Also write the results as JSON to this file (and .hgrm percentile files beside it).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also run the workload against this Kafka-compatible broker, in interleaved rounds, and
    /// print both with their ratio (this broker is B, --bootstrap is A).
    #[arg(long, value_name = "HOST:PORT")]
    compare: Option<String>,
    /// Rounds per broker (default 3 with --compare, else 1); figures are medians with their range.
    #[arg(long)]
    rounds: Option<u32>,
    /// Draw every run's publish and end-to-end latency percentile curves into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Producer connections per topic, overriding the workload's `producers_per_topic`.
    #[arg(long)]
    threads: Option<u32>,
    /// Pin the bench's threads to these cores (e.g. `1` or `2-3`), away from the broker's.
    #[arg(long)]
    cores: Option<String>,
}

fn bench(a: BenchArgs) -> Result<()> {
    use strom::client::{bench, bench_report};
    let mut w = bench::Workload::load(&a.workload)?;
    if let Some(t) = a.threads {
        anyhow::ensure!(t > 0, "--threads must be positive");
        w.producers_per_topic = t;
    }
    let opts = bench::RunOptions {
        duration_s: a.duration_s,
        hgrm_prefix: a.json.clone(),
        cores: a
            .cores
            .as_deref()
            .map(config::parse_core_list)
            .transpose()?
            .unwrap_or_default(),
    };
    let mut targets = vec![bench_report::Target {
        bootstrap: a.bootstrap,
        label: "A",
    }];
    if let Some(other) = a.compare {
        targets.push(bench_report::Target {
            bootstrap: other,
            label: "B",
        });
    }
    let rounds = a.rounds.unwrap_or(if targets.len() > 1 { 3 } else { 1 });
    anyhow::ensure!(rounds > 0, "--rounds must be positive");
    let runs = bench_report::run_rounds(&targets, &w, &opts, rounds)?;
    if let Some(path) = &a.plot {
        let title = format!("strom bench {}: latency by percentile", w.name);
        bench_report::plot(path, &title, &runs)?;
    }
    if runs.len() == 1 {
        let result = &runs[0].result;
        print!("{}", bench::table(result));
        if let Some(path) = &a.json {
            std::fs::write(path, serde_json::to_string_pretty(result)? + "\n")?;
        }
        return Ok(());
    }
    let report = bench_report::report(&targets, runs)?;
    print!("{}", bench_report::table(&report));
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(())
}

fn produce(
    topic: String,
    bootstrap: String,
    key_separator: Option<String>,
    headers: &[String],
    partition: Option<i32>,
    acks: &str,
    compression: &str,
) -> Result<()> {
    use strom::client::produce;
    let options = produce::ProduceOptions {
        topic,
        bootstrap,
        key_separator,
        headers: produce::parse_headers(headers)?,
        partition,
        acks: produce::parse_acks(acks)?,
        compression: produce::parse_compression(compression)?,
    };
    let failed = produce::run(&options)?;
    if failed > 0 {
        anyhow::bail!("{failed} records were not acknowledged");
    }
    Ok(())
}

fn consume(
    topic: String,
    bootstrap: String,
    from: &str,
    group: Option<String>,
    num: Option<u64>,
    format: String,
) -> Result<()> {
    use strom::client::consume;
    let options = consume::ConsumeOptions {
        topic,
        bootstrap,
        from: consume::parse_from(from)?,
        group,
        num,
        format,
    };
    consume::run(&options)?;
    Ok(())
}

fn topic(command: TopicCommand) -> Result<()> {
    use strom::client::topics;
    let out = match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
            bootstrap,
        } => topics::create(
            &bootstrap,
            &name,
            partitions,
            replication_factor,
            &topics::parse_configs(&configs)?,
        )?,
        TopicCommand::List { bootstrap } => topics::list(&bootstrap)?,
        TopicCommand::Describe { name, bootstrap } => topics::describe(&bootstrap, &name)?,
        TopicCommand::Alter {
            name,
            configs,
            delete_configs,
            bootstrap,
        } => topics::alter(
            &bootstrap,
            &name,
            &topics::parse_configs(&configs)?,
            &delete_configs,
        )?,
        TopicCommand::Delete { name, bootstrap } => topics::delete(&bootstrap, &name)?,
        TopicCommand::AddPartitions {
            name,
            partitions,
            bootstrap,
        } => topics::add_partitions(&bootstrap, &name, partitions)?,
    };
    print!("{out}");
    Ok(())
}

fn group(command: GroupCommand) -> Result<()> {
    let out = match command {
        GroupCommand::List { bootstrap } => strom::client::groups::list(&bootstrap)?,
        GroupCommand::Describe { group, bootstrap } => {
            strom::client::groups::describe(&bootstrap, &group)?
        }
        GroupCommand::ResetOffsets {
            group,
            topics,
            to_earliest,
            to_latest,
            to_offset,
            execute,
            bootstrap,
        } => {
            use strom::client::share_offsets::{reset, ResetTo};
            let to = match (to_earliest, to_latest, to_offset) {
                (true, _, _) => ResetTo::Earliest,
                (_, true, _) => ResetTo::Latest,
                (_, _, Some(o)) => ResetTo::Offset(o),
                _ => anyhow::bail!("give --to-earliest, --to-latest or --to-offset"),
            };
            reset(&bootstrap, &group, &topics, to, execute)?
        }
        GroupCommand::DeleteOffsets {
            group,
            topics,
            bootstrap,
        } => strom::client::share_offsets::delete(&bootstrap, &group, &topics)?,
    };
    print!("{out}");
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    let broker = BrokerConfig::load(args.config.as_deref(), &args.set)?;
    let requested = match (&args.cores, &args.tuning) {
        (Some(spec), _) => Some(config::parse_core_list(spec)?),
        (None, Some(profile)) => config::load_core_profile(profile)?,
        (None, None) => None,
    };
    let cores = startup::resolve_cores(requested)?;
    let options = ServeOptions {
        listen: args.listen,
        admin_listen: args.admin_listen,
        data_dir: args.data_dir,
        cores,
        broker,
        clean_start: false,
    };
    startup::run(options, |bound, admin| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "strom admin on {admin}");
        let _ = writeln!(out, "strom listening on {bound}");
        let _ = out.flush();
    })
}
