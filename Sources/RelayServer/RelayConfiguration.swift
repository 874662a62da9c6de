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
    public var sseRetryMilliseconds = 2000
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

    public init(
        socketPath: String = "/run/progress.sock",
        socketMode: UInt32 = 0o660,
        adoptedIngestDescriptor: CInt? = nil,
        adoptedHTTPDescriptor: CInt? = nil,
        listenHost: String = "127.0.0.1",
        listenPort: Int = 8765,
        allowedOrigins: Set<WebOrigin> = [],
        maxEventBytes: Int = 65536,
        maxOutboundBytes: Int = 4 * 1024 * 1024,
        maxSubscriptions: Int = 100,
        maxPatternSubscriptions: Int = 8,
        maxClientMessageBytes: Int = 64 * 1024,
        pingInterval: TimeAmount = .seconds(25),
        stateFile: String? = nil,
        hub: HubConfiguration = HubConfiguration(),
        threads: Int = System.coreCount,
        ingestBudgetBytes: Int = 16 * 1024 * 1024,
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
