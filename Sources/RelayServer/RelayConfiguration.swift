// RelayConfiguration: everything `serve` was told, as the server needs it.

import NIOCore
import RelayHub

public struct RelayConfiguration: Sendable {
    /// Where the ingest socket is bound, unless one is adopted.
    public var socketPath: String
    public var socketMode: UInt32
    /// A listening AF_UNIX descriptor handed over by systemd, used instead of binding `socketPath`.
    public var adoptedIngestDescriptor: CInt?
    /// A listening TCP descriptor handed over by systemd, used instead of binding `listenHost:listenPort`.
    public var adoptedHTTPDescriptor: CInt?
    public var listenHost: String
    public var listenPort: Int
    /// When non-empty, browsers from other origins (except the relay's own) are refused.
    public var allowedOrigins: Set<WebOrigin>
    public var maxEventBytes: Int
    public var maxOutboundBytes: Int
    public var maxSubscriptions: Int
    /// Of those, patterns (`--max-pattern-subscriptions`); the relay-wide bound is in `hub`.
    public var maxPatternSubscriptions: Int
    /// Largest client message after reassembly.
    public var maxClientMessageBytes: Int
    public var pingInterval: TimeAmount
    /// `--sse-retry`: the `retry:` an SSE stream starts with (milliseconds before a browser reconnects).
    public var sseRetryMilliseconds = RelayConfiguration.defaultSSERetryMilliseconds
    public var stateFile: String?
    public var hub: HubConfiguration
    /// Event loops for subscribers; the hub and the emitter connections have a thread of their own.
    public var threads: Int
    /// Event bytes that may be on their way from the emitters to the subscriber loops at once
    /// (`--max-inflight-bytes`, `IngestBudget`): the bound on that queue, and what lets the loops
    /// coalesce writes.
    public var ingestBudgetBytes: Int
    /// Cluster mode (`--redis`): Redis numbers events, and relays sharing it act as one.
    public var cluster: ClusterSettings?
    /// `--publish-grant`: which topics each emitter connection may publish to, by the uid and
    /// groups the kernel reports for it. nil (no grant given): every topic, as before.
    public var publishPolicy: PublishPolicy?
    /// `--max-emitters`, `--max-emitters-per-uid` and the emitter timeouts (`EmitterLimits`).
    public var emitterLimits: EmitterLimitSettings
    /// `--max-connections`, `--max-connections-per-ip`, `--trusted-proxy`, `--handshake-timeout`.
    public var httpEdge: HTTPEdgeSettings

    // The defaults, here only: `serve`'s flags show and use these (docs/protocol.md lists them).
    // ProgressEmitter, which cannot import this module, keeps its own copy of the socket path.
    /// `--socket`.
    public static let defaultSocketPath = "/run/progress.sock"
    /// `--socket-mode`: owner and group may connect.
    public static let defaultSocketMode: UInt32 = 0o660
    /// The host of `--listen`: loopback, so that a relay is reachable from elsewhere only when told.
    public static let defaultListenHost = "127.0.0.1"
    /// The port of `--listen`.
    public static let defaultListenPort = 8765
    /// `--max-event-bytes`.
    public static let defaultMaxEventBytes = 64 * 1024
    /// `--max-outbound-bytes`.
    public static let defaultMaxOutboundBytes = 4 * 1024 * 1024
    /// `--max-subscriptions`.
    public static let defaultMaxSubscriptions = 100
    /// `--max-pattern-subscriptions`.
    public static let defaultMaxPatternSubscriptions = 8
    /// Largest client message after reassembly (no flag).
    public static let defaultMaxClientMessageBytes = 64 * 1024
    /// `--ping-interval`.
    public static let defaultPingInterval: TimeAmount = .seconds(25)
    /// `--sse-retry`.
    public static let defaultSSERetryMilliseconds = 2000
    /// `--max-inflight-bytes`.
    public static let defaultIngestBudgetBytes = 16 * 1024 * 1024

    public init(
        socketPath: String = RelayConfiguration.defaultSocketPath,
        socketMode: UInt32 = RelayConfiguration.defaultSocketMode,
        adoptedIngestDescriptor: CInt? = nil,
        adoptedHTTPDescriptor: CInt? = nil,
        listenHost: String = RelayConfiguration.defaultListenHost,
        listenPort: Int = RelayConfiguration.defaultListenPort,
        allowedOrigins: Set<WebOrigin> = [],
        maxEventBytes: Int = RelayConfiguration.defaultMaxEventBytes,
        maxOutboundBytes: Int = RelayConfiguration.defaultMaxOutboundBytes,
        maxSubscriptions: Int = RelayConfiguration.defaultMaxSubscriptions,
        maxPatternSubscriptions: Int = RelayConfiguration.defaultMaxPatternSubscriptions,
        maxClientMessageBytes: Int = RelayConfiguration.defaultMaxClientMessageBytes,
        pingInterval: TimeAmount = RelayConfiguration.defaultPingInterval,
        stateFile: String? = nil,
        hub: HubConfiguration = HubConfiguration(),
        threads: Int = System.coreCount,
        ingestBudgetBytes: Int = RelayConfiguration.defaultIngestBudgetBytes,
        cluster: ClusterSettings? = nil,
        publishPolicy: PublishPolicy? = nil,
        emitterLimits: EmitterLimitSettings = EmitterLimitSettings(),
        httpEdge: HTTPEdgeSettings = HTTPEdgeSettings()
    ) {
        self.socketPath = socketPath
        self.socketMode = socketMode
        self.adoptedIngestDescriptor = adoptedIngestDescriptor
        self.adoptedHTTPDescriptor = adoptedHTTPDescriptor
        self.listenHost = listenHost
        self.listenPort = listenPort
        self.allowedOrigins = allowedOrigins
        self.maxEventBytes = maxEventBytes
        self.maxOutboundBytes = maxOutboundBytes
        self.maxSubscriptions = maxSubscriptions
        self.maxPatternSubscriptions = maxPatternSubscriptions
        self.maxClientMessageBytes = maxClientMessageBytes
        self.pingInterval = pingInterval
        self.stateFile = stateFile
        self.hub = hub
        self.threads = threads
        self.ingestBudgetBytes = ingestBudgetBytes
        self.cluster = cluster
        self.publishPolicy = publishPolicy
        self.httpEdge = httpEdge
        self.emitterLimits = emitterLimits
    }
}
