//! What the user can type: every command, flag and help text of
//! `fleetctl`. The handlers live in `cmd`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Fleet: deployments that never overlap on a destination",
    long_about = "fleetctl talks to a Fleet coordinator cluster.\n\n\
Connection: --addr (or FLEET_ADDR) lists coordinators, any of them; fleetctl follows the leader and \
retries across the list when one dies. Credentials: --ca/--cert/--key (or FLEET_CA, FLEET_CERT, \
FLEET_KEY), or a context file (--context / FLEET_CONTEXT) such as the one `fleetctl dev up` writes.\n\n\
Quick start on one machine (from the repository root):\n  fleetctl dev up\n  export FLEET_CONTEXT=.fleet-dev/context.json\n  \
fleetctl deploy -f examples/demo/fleet.yaml\n  fleetctl deploy -f examples/demo/fleet-broken.yaml   # fails, undone: exit 3\n  \
fleetctl history\n  fleetctl dev down\n\n\
Exit codes: 0 ok · 1 cluster error · 2 usage or invalid input · 3 deployment failed and was undone · \
4 cancelled · 5 timed out · 6 undo failed, a human must act · 7 rejected (busy)"
)]
pub struct Cli {
    /// Output format: text for people, json for scripts (one object, or one
    /// object per line for commands that follow a deployment).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Connection")]
pub struct ConnArgs {
    /// Coordinator addresses, comma-separated (any coordinator will do).
    #[arg(long, env = "FLEET_ADDR", value_delimiter = ',', global = true)]
    pub addr: Vec<String>,
    /// CA certificate of the cluster.
    #[arg(long, env = "FLEET_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Your certificate (role operator for changes, viewer to read).
    #[arg(long, env = "FLEET_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your private key.
    #[arg(long, env = "FLEET_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Context file with addrs, ca, cert and key (JSON). Default:
    /// .fleet-dev/context.json when it exists.
    #[arg(long, env = "FLEET_CONTEXT", global = true)]
    pub context: Option<PathBuf>,
    /// Keep retrying for this long when no coordinator answers.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub retry_for: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Deploy a release (fleet.yaml) and follow it to the end; exit code = outcome.
    #[command(long_about = DEPLOY_ABOUT, after_long_help = DEPLOY_EXAMPLES)]
    Deploy(DeployArgs),
    /// Follow a deployment until it ends; same output and exit codes as deploy.
    #[command(
        after_long_help = "Examples:\n  fleetctl watch d12\n  fleetctl watch d12 -o json   # one JSON object per event, then {\"type\":\"result\",...}"
    )]
    Watch {
        /// Deployment id, e.g. d12 (`fleetctl list` shows them).
        id: String,
    },
    /// One deployment in detail (steps, errors, event log), or, without ID,
    /// every deployment that is queued or running.
    #[command(
        after_long_help = "Examples:\n  fleetctl status            # what is queued or running\n  fleetctl status d12        # steps with node, attempt, times, errors; the event log\n  fleetctl status d12 -o json"
    )]
    Status {
        /// Deployment id, e.g. d12.
        id: Option<String>,
    },
    /// Recent deployments, newest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Which releases were deployed where, and how each ended; with
    /// --audit, every operator action (who, how, from where, what, outcome).
    ///
    /// The cluster keeps the newest 10,000 ended deployments and every
    /// current release (the last that succeeded, per app and destination);
    /// only the newest 1,000 ended keep their step details for `status`.
    #[command(
        after_long_help = "Examples:\n  fleetctl history --app web --destination prod\n  fleetctl history -o json | jq '.[] | select(.state == \"succeeded\") | .release'\n  fleetctl history --audit               # deploys, cancels, locks, tokens, membership changes\n  fleetctl history --audit -o json | jq '.[] | select(.via == \"token\")'"
    )]
    History {
        /// Only this app.
        #[arg(long, conflicts_with = "audit")]
        app: Option<String>,
        /// Only this destination.
        #[arg(long, conflicts_with = "audit")]
        destination: Option<String>,
        /// The audit log instead: operator actions, newest first (the
        /// newest 10,000 are kept).
        #[arg(long)]
        audit: bool,
        /// How many, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a deployment: the step in flight finishes, then every
    /// completed step is undone. Refused (exit 7) when it already ended.
    #[command(
        after_long_help = "Examples:\n  fleetctl cancel d12 --reason \"wrong release\"\n  fleetctl cancel d12 --wait     # follow the undo; exit 4 once cancelled"
    )]
    Cancel {
        /// Deployment id, e.g. d12.
        id: String,
        /// Why (recorded in the deployment's event log).
        #[arg(long)]
        reason: Option<String>,
        /// Follow the cancellation to its end, like `watch` (exit 4 when cancelled).
        #[arg(long)]
        wait: bool,
    },
    /// Promote a paused canary deployment (`strategy.canary`): it goes on to
    /// the other nodes. Refused (exit 7) when it is not paused.
    #[command(
        after_long_help = "Examples:\n  fleetctl promote d12\n  fleetctl promote d12 --wait    # follow it to the end, like `watch`\n\n`fleetctl cancel d12` undoes a paused canary instead (exit 4)."
    )]
    Promote {
        /// Deployment id, e.g. d12.
        id: String,
        /// Follow the deployment to its end, like `watch`.
        #[arg(long)]
        wait: bool,
    },
    /// Record that a human checked a deployment whose compensation failed
    /// (state compensation_failed), and free its destination.
    #[command(after_long_help = "Examples:\n  fleetctl resolve d12 --note \"removed the half-started container by hand\"")]
    Resolve {
        /// Deployment id, e.g. d12.
        id: String,
        /// What you checked or fixed (recorded in the event log).
        #[arg(long)]
        note: String,
    },
    /// Deploy an earlier release again: a new deployment of the release that
    /// succeeded before ID (or --to RELEASE) on the same app and destination.
    #[command(
        after_long_help = "Examples:\n  fleetctl rollback d12              # to the release that was live before d12\n  fleetctl rollback d12 --to v1 --timeout 5m\n\nExit codes as for deploy; 7 when there is no earlier succeeded release."
    )]
    Rollback(RollbackArgs),
    /// Destinations: selector, queue policy, lock holder, queue, current
    /// releases and matching nodes. `destinations apply -f FILE` changes them.
    #[command(args_conflicts_with_subcommands = true)]
    Destinations {
        #[command(subcommand)]
        cmd: Option<DestinationsCmd>,
    },
    /// Worker nodes: labels, whether connected to the leader, last seen.
    Nodes,
    /// The servers of a destination as its sync task found them: health,
    /// the release each runs per app, where it serves it, last seen, drift
    /// (a release other than the destination's current one).
    Servers {
        /// The destination.
        destination: String,
    },
    /// Manual destination locks (maintenance windows, migrations).
    #[command(subcommand)]
    Lock(LockCmd),
    /// Coordinator membership and health.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// API tokens for the HTTP API and the dashboard (browsers, scripts).
    /// Managed with an operator certificate; the cluster keeps only a hash.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Create the cluster CA and certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// A local cluster on this machine for trying Fleet out.
    #[command(subcommand)]
    Dev(DevCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
pub enum TokensCmd {
    /// Make a token and print it (once): `Authorization: Bearer <token>` on
    /// the HTTP API, or sign in to the dashboard with it.
    #[command(
        after_long_help = "Examples:\n  fleetctl tokens create alice --role viewer\n  fleetctl tokens create ci-deployer --role operator --expires 90d -o json | jq -r .token\n\nThe token is shown only now; the cluster stores its SHA-256. Revoke it with `fleetctl tokens revoke NAME`."
    )]
    Create {
        /// A name for the token (the audit log records actions as `token:NAME`).
        name: String,
        /// viewer: read everything; operator: also deploy, cancel, roll back, promote.
        #[arg(long, value_enum)]
        role: TokenRole,
        /// Expire after this long (e.g. 12h, 90d); default never.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// The tokens: name, role, when and by whom made, expiry (never the secret).
    List,
    /// Revoke a token: each coordinator refuses it once it has applied the
    /// revocation (the leader at once, followers within a heartbeat).
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TokenRole {
    Viewer,
    Operator,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Viewer => "viewer",
            TokenRole::Operator => "operator",
        }
    }
}

#[derive(Subcommand)]
pub enum LockCmd {
    /// Take the lock of DEST. Exit 0 when granted (also if you already hold
    /// it), 7 when someone else holds it, 5 when --wait expired.
    Acquire {
        destination: String,
        /// Why (shown to everyone who finds the lock taken).
        #[arg(short = 'm', long)]
        message: String,
        /// Wait up to this long for the holder to release it (e.g. 30s, 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
    },
    /// Release a lock you hold. Refused (exit 7) when someone else holds it.
    Release { destination: String },
    /// Who holds which lock, since when, with which fencing token.
    Status { destination: Option<String> },
    /// Who holds DEST and which deployments wait for it, in order.
    Queue { destination: String },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, roles, leader, term, commit/applied index, lag per member.
    Status {
        /// Ask only the coordinator(s) given, without following the leader.
        #[arg(long)]
        local: bool,
    },
    /// Add a coordinator as a non-voting learner; returns once the leader
    /// has replicated its log (or sent its snapshot) to it. Applying a large
    /// snapshot takes the learner longer (seconds at 100 MB): before
    /// `promote`, check with `fleetctl cluster status --local` against the
    /// learner that its applied index has caught up.
    AddLearner {
        id: u64,
        #[arg(value_name = "ADDR")]
        address: String,
    },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a coordinator (voter or learner) from the cluster.
    Remove { id: u64 },
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Create a CA and one certificate per role (coordinator, node, operator, viewer).
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing CA in --out.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for ROLE (coordinator, node, operator, viewer) named NAME.
    Issue {
        role: String,
        name: String,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Where to write NAME.pem and NAME-key.pem (default: --ca-dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Extra DNS name or IP for the certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum DevCmd {
    /// Start a local cluster: certificates, N coordinators on free ports,
    /// worker nodes (node-1 in zone a, node-2 in zone b, all labelled
    /// env=dev) and a destination `dev` that selects them.
    #[command(
        after_long_help = "Then:\n  export FLEET_CONTEXT=.fleet-dev/context.json\n  fleetctl nodes\n  fleetctl deploy -f examples/demo/fleet.yaml\n  fleetctl dev down            # --purge also deletes .fleet-dev"
    )]
    Up {
        #[arg(long, default_value_t = 3)]
        coordinators: u64,
        /// Worker nodes to start (fleet-node); 0 for coordinators only.
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Destinations file to apply (default: the demo's, which defines
        /// `dev` with selector env=dev and queue policy `queue`).
        #[arg(long, value_name = "FILE")]
        destinations: Option<PathBuf>,
        /// Where certificates, data and logs go.
        #[arg(long, default_value = ".fleet-dev")]
        dir: PathBuf,
    },
    /// Stop the local cluster (data stays; `dev up` starts it again).
    Down {
        #[arg(long, default_value = ".fleet-dev")]
        dir: PathBuf,
        /// Also delete its data, certificates and logs.
        #[arg(long)]
        purge: bool,
    },
}

pub const DEPLOY_ABOUT: &str = "\
Deploy a release of an app to a destination, and follow it to the end.

fleetctl reads the manifest (./fleet.yaml unless -f says otherwise) and validates it here first, so a \
typo costs no round trip and submits nothing. The cluster then queues the deployment behind any other \
one on the same destination (one at a time, always), plans it into steps — node by node: start the new \
release next to the old one, health-check it, switch the route, stop the old one — and runs them on the \
destination's worker nodes. If a step fails, every completed step is undone in reverse order.

Several destinations (--destination twice, or `destinations: [a, b]`) make a stack: one saga that takes \
every destination's lock in one step (so two stacks never deadlock) and succeeds or is undone as a whole. \
A `command` destination runs the manifest's `steps:` (terraform, ansible, compose, scripts) once each on \
one of its nodes; if that node dies mid-step, the step moves to another node, which runs its `check` first.

Unless --detach is given, fleetctl follows the deployment until it ends: progress bars on a terminal, one \
plain line per change otherwise, and with -o json one JSON object per line: \
{\"type\":\"submitted\",...}, {\"type\":\"transition\",...} per lifecycle change, {\"type\":\"step\",...} per \
step change, and a final {\"type\":\"result\",\"exit_code\":N,\"deployment\":{...}}. Ctrl-C stops watching, \
not the deployment; `fleetctl watch ID` picks it up again.

Exit codes (CI can rely on them):
  0  succeeded
  1  error talking to the cluster
  2  invalid manifest or usage; nothing was submitted
  3  failed; every completed step was undone
  4  cancelled (or superseded by a newer deployment under the `coalesce` policy)
  5  timed out: the deadline (--timeout) passed; what ran was undone
  6  undoing failed: a human must check the destination (it stays locked)
  7  rejected: the destination is busy and its queue policy is `reject`";

pub const DEPLOY_EXAMPLES: &str = "\
A fleet.yaml:

  app: web
  release: v2
  destination: staging
  # {port} and {release} are filled in; $PORT and $FLEET_RELEASE are set too
  run: [\"./web-server\", \"--port\", \"{port}\"]
  env: { GREETING: hello }
  health:                  # exactly one of http: /path, tcp: true, command: [...]
    http: /healthz
    interval: 200ms
    timeout: 1s
    healthy_threshold: 2   # consecutive passes needed
    deadline: 20s          # give up (and undo) after this long
  # optional: strategy: { max_unavailable: 1 }    nodes switched at once
  #           hooks: { pre: [\"...\"], post: [\"...\"] }
  #           retry: { max_attempts: 3, backoff: 500ms }
  #           timeout: 30m   step_timeout: 5m   port: 8080   drain: 5s

A fleet.yaml for a `command` destination (instead of run: and health:):

  app: network
  release: v7
  destination: infra
  steps:
    - { name: plan,  run: \"terraform plan -out tf.plan\" }
    - { name: apply, run: \"terraform apply tf.plan\", check: \"./applied v7\", undo: \"./restore v6\", timeout: 20m }
    - { name: migrate, run: \"./migrate\", irreversible: true }   # never undone: a failure after it needs a human
  # commands exit 75 for a temporary failure (retried), 77 for a refused credential (fails at once)

Examples:
  fleetctl deploy                                   # ./fleet.yaml; follow it to the end
  fleetctl deploy -f web.yaml --release v3 --destination prod --timeout 15m
  fleetctl deploy --destination db --destination web  # a stack: both or neither
  id=$(fleetctl deploy --detach) && fleetctl watch \"$id\"
  fleetctl deploy -o json | jq -c 'select(.type == \"result\")'
  fleetctl rollback d12                             # back to the release before d12";

#[derive(Args)]
pub struct DeployArgs {
    /// The manifest to deploy.
    #[arg(short = 'f', long = "file", value_name = "FILE", default_value = "fleet.yaml")]
    pub file: PathBuf,
    /// Deploy to this destination instead of the manifest's `destination:`;
    /// repeat it for a stack (all or nothing, locks taken together).
    #[arg(long = "destination", value_name = "D")]
    pub destinations: Vec<String>,
    /// Deploy this release instead of the manifest's `release:`.
    #[arg(long, value_name = "R")]
    pub release: Option<String>,
    /// Print the deployment's id (JSON: the `submitted` object) and return
    /// at once; `fleetctl watch ID` follows it later.
    #[arg(long)]
    pub detach: bool,
    /// Deadline of the whole deployment, counted from submission (e.g.
    /// 10m). When it passes, the cluster cancels the deployment and undoes
    /// what ran (exit 5). Default: the manifest's `timeout:`, else 30m.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Running the command again with the same key (from the same
    /// certificate) returns the same deployment instead of submitting a
    /// second one, however much later (for CI jobs that retry).
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Give up if the destination lock is not granted within this long
    /// (e.g. 10m): the deployment ends cancelled, exit 5. Default: wait
    /// until the deadline.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub lock_wait: Option<Duration>,
    /// Print the plan (steps per node, what each undo does) against the
    /// cluster's current nodes and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The deployment whose app and destination to roll back (e.g. d12).
    pub id: String,
    /// Release to go back to (default: the last release that succeeded on
    /// the destination before ID).
    #[arg(long = "to", value_name = "RELEASE")]
    pub to: Option<String>,
    /// Print the rollback's id and return at once.
    #[arg(long)]
    pub detach: bool,
    /// Deadline of the rollback, counted from submission.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Subcommand)]
pub enum DestinationsCmd {
    /// List the destinations (what `fleetctl destinations` does).
    List,
    /// Create or replace the destinations a YAML file describes; the others
    /// stay as they are.
    #[command(after_long_help = DESTINATIONS_EXAMPLE)]
    Apply {
        /// The destinations file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Remove a destination and its servers. Refused (exit 7) while a
    /// deployment holds or waits for it, or a manual lock is held.
    Remove {
        /// The destination to remove.
        name: String,
    },
}

pub const DESTINATIONS_EXAMPLE: &str = "\
A destinations file:

  destinations:
    - name: staging
      adapter: process          # the default (and, for now, the only one)
      selector: { env: staging } # nodes whose labels include all of these
      queue: queue               # queue (FIFO, default) | coalesce | reject
    - name: prod
      selector: { env: prod }
      queue: reject

Example:
  fleetctl destinations apply -f destinations.yaml";
