// `progress-relay serve`: checks the flags, then starts the relay under
// service-lifecycle, which turns SIGTERM and SIGINT into a graceful shutdown.

import ArgumentParser
import Foundation
import Logging
import Metrics
import NIOCore
import Prometheus
import RelayAuth
import RelayCluster
import RelayHub
import RelayServer
import ServiceLifecycle
import UnixSignals

#if canImport(Glibc)
import Glibc
#endif

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serve", abstract: "Run the relay.")

    // The flags' defaults come from the configuration types (RelayConfiguration, HubConfiguration,
    // EmitterLimitSettings, HTTPEdgeSettings, ClusterPublisherConfiguration), where they are kept.
    static let defaultListen = "\(RelayConfiguration.defaultListenHost):\(RelayConfiguration.defaultListenPort)"

    /// A default duration as the seconds its flag takes.
    private static func seconds(_ amount: TimeAmount) -> Double { Double(amount.nanoseconds) / 1e9 }

    @Option(help: "Ingest socket path.")
    var socket: String?

    @Option(name: .customLong("socket-mode"), help: "Permissions of the socket file (octal).")
    var socketMode: String = "0" + String(RelayConfiguration.defaultSocketMode, radix: 8)

    @Option(help: "HTTP and WebSocket listener, HOST:PORT.")
    var listen: String = Self.defaultListen

    @Option(
        name: .customLong("jwt-secret-file"),
        help: "HMAC secret (at least 32 bytes) for HS256/HS384/HS512 tokens; twice while rotating (new and retiring key).")
    var jwtSecretFiles: [String] = []

    @Option(
        name: .customLong("jwt-public-key-file"),
        help: "PEM public key for RS256, ES256 or EdDSA tokens; twice while rotating (new and retiring key).")
    var jwtPublicKeyFiles: [String] = []

    @Option(
        name: .customLong("jwt-kid"),
        help: "FILE=KID: the kid of a key file (default: its file name without extension) (repeatable).")
    var jwtKids: [String] = []

    @Option(name: .customLong("jwt-audience"), help: "When set, a token's aud must name it (e.g. progress-relay).")
    var jwtAudience: String?

    @Option(name: .customLong("jwt-issuer"), help: "When set, a token's iss must be it.")
    var jwtIssuer: String?

    @Option(
        name: .customLong("jwt-leeway"), parsing: .unconditional,
        help: "Seconds of clock skew allowed on exp, nbf and iat (0 to 300).")
    var jwtLeeway: Int = 0

    @Option(name: .customLong("grant"), help: "Topic pattern every valid token is granted; {sub} is the token's sub (repeatable).")
    var grants: [String] = []

    @Option(
        name: .customLong("publish-grant"),
        help: """
            WHO=PATTERN: emitters connecting as WHO (uid:N, user:NAME, gid:N, group:NAME or *) may publish \
            to PATTERN ({uid} and {user} allowed); with any, other topics are refused (repeatable).
            """)
    var publishGrants: [String] = []

    @Option(name: .customLong("allow-origin"), help: "Browser origin allowed to connect (repeatable; default any).")
    var allowOrigins: [String] = []

    // Numbers are parsed `.unconditional`ly, so `--history -1` is the value -1 (refused with the
    // flag's rule) rather than "missing value" for a flag that looks like another flag.
    @Option(parsing: .unconditional, help: "Events of each topic kept for resume.")
    var history: Int = HubConfiguration.defaultHistoryLimit

    @Option(name: .customLong("max-event-bytes"), parsing: .unconditional, help: "Longest accepted ingest line.")
    var maxEventBytes: Int = RelayConfiguration.defaultMaxEventBytes

    @Option(
        name: .customLong("max-outbound-bytes"), parsing: .unconditional,
        help: "Unsent bytes a subscriber may owe before it is cut off.")
    var maxOutboundBytes: Int = RelayConfiguration.defaultMaxOutboundBytes

    @Option(
        name: .customLong("max-inflight-bytes"), parsing: .unconditional,
        help: "Event bytes read from emitters and not yet written by every subscriber loop; beyond it emitters wait.")
    var maxInflightBytes: Int = RelayConfiguration.defaultIngestBudgetBytes

    @Option(
        name: .customLong("max-emitters"), parsing: .unconditional,
        help: "Emitter connections held at once; beyond it new ones wait in the socket's backlog.")
    var maxEmitters: Int = EmitterLimitSettings.defaultMaxEmitters

    // Optional so that a lower --max-emitters alone lowers the share with it.
    @Option(
        name: .customLong("max-emitters-per-uid"), parsing: .unconditional,
        help: """
            Emitter connections of one uid read at once (default \(EmitterLimitSettings.defaultMaxEmittersPerUID)); \
            more are accepted and wait unread.
            """)
    var maxEmittersPerUID: Int?

    @Option(
        name: .customLong("emitter-idle-timeout"), parsing: .unconditional,
        help: "Seconds an emitter connection may send nothing before it is drained and closed.")
    var emitterIdleTimeout: Double = Self.seconds(EmitterLimitSettings.defaultIdleTimeout)

    @Option(
        name: .customLong("emitter-partial-line-timeout"), parsing: .unconditional,
        help: "Seconds an unfinished ingest line may wait for its end before its connection is drained.")
    var emitterPartialLineTimeout: Double = Self.seconds(EmitterLimitSettings.defaultPartialLineTimeout)

    // Optional: its default depends on the open files limit, known once it is raised.
    @Option(
        name: .customLong("max-connections"), parsing: .unconditional,
        help: """
            HTTP and WebSocket connections held at once (default: the open files limit less \
            \(Self.reservedDescriptors), at least \(HTTPEdgeSettings.fallbackMaxConnections)); more get 503.
            """)
    var maxConnections: Int?

    @Option(
        name: .customLong("max-connections-per-ip"), parsing: .unconditional,
        help: "HTTP and WebSocket connections one client address may hold; more get 503.")
    var maxConnectionsPerIP: Int = HTTPEdgeSettings.defaultMaxConnectionsPerAddress

    @Option(
        name: .customLong("trusted-proxy"),
        help: "CIDR of a proxy whose X-Forwarded-For/Forwarded names the client (repeatable; default 127.0.0.0/8 and ::1).")
    var trustedProxies: [String] = []

    @Option(
        name: .customLong("handshake-timeout"), parsing: .unconditional,
        help: "Seconds a connection has to complete its WebSocket handshake or HTTP request.")
    var handshakeTimeout: Double = Self.seconds(HTTPEdgeSettings.defaultHandshakeTimeout)

    @Option(name: .customLong("ping-interval"), parsing: .unconditional, help: "Seconds between WebSocket pings.")
    var pingInterval: Double = Self.seconds(RelayConfiguration.defaultPingInterval)

    @Option(
        name: .customLong("sse-retry"), parsing: .unconditional,
        help: "Milliseconds an SSE client (EventSource) waits before it reconnects (the stream's `retry:`).")
    var sseRetry: Int = RelayConfiguration.defaultSSERetryMilliseconds

    @Option(name: .customLong("state-file"), help: "State written on shutdown and read back on start.")
    var stateFile: String?

    @Option(
        name: .customLong("max-topics"), parsing: .unconditional,
        help: "Topics kept; beyond it the longest-idle topic is forgotten.")
    var maxTopics: Int = HubConfiguration.defaultMaxTopics

    @Option(
        name: .customLong("max-history-bytes"), parsing: .unconditional,
        help: "Bytes of stored events over all topics (a plain number of bytes, at least 65536); beyond it the oldest history is dropped.")
    var maxHistoryBytes: Int = HubConfiguration.defaultMaxHistoryBytes

    @Option(name: .customLong("max-subscriptions"), parsing: .unconditional, help: "Subscriptions one connection may hold.")
    var maxSubscriptions: Int = RelayConfiguration.defaultMaxSubscriptions

    @Option(
        name: .customLong("max-pattern-subscriptions"), parsing: .unconditional,
        help: "Pattern subscriptions one connection may hold (part of --max-subscriptions).")
    var maxPatternSubscriptions: Int = RelayConfiguration.defaultMaxPatternSubscriptions

    @Option(
        name: .customLong("max-pattern-subscriptions-total"), parsing: .unconditional,
        help: "Pattern subscriptions all connections together may hold.")
    var maxPatternSubscriptionsTotal: Int = HubConfiguration.defaultMaxPatternSubscriptions

    @Option(name: .customLong("topic-ttl"), parsing: .unconditional, help: "Seconds an idle topic is kept.")
    var topicTTL: Double = Double(HubConfiguration.defaultTopicTTL) / 1e9

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning or error.")
    var logLevel: String = "info"

    @Flag(
        name: .customLong("allow-tokens-without-exp"),
        help: "Accept tokens that carry no exp claim. A risk: such a token, once leaked, is valid forever.")
    var allowTokensWithoutExp = false

    @Flag(help: "Development mode: a random secret and a ready token, printed to standard output.")
    var dev = false

    @Option(
        help: """
            Cluster mode: relays sharing this Redis act as one. redis://[user:password@]host:port[/db] \
            or unix:///path/redis.sock (put a password in PROGRESS_RELAY_REDIS, not on the command line).
            """)
    var redis: String?

    @Option(name: .customLong("redis-prefix"), help: "Prefix of every Redis key and channel of this cluster.")
    var redisPrefix: String = ClusterPublisherConfiguration.defaultPrefix

    @Option(
        name: .customLong("redis-queue-bytes"), parsing: .unconditional,
        help: "Ingest bytes that may wait for Redis before the relay stops reading emitter sockets.")
    var redisQueueBytes: Int = ClusterPublisherConfiguration.defaultQueueBytes

    @Option(
        name: .customLong("redis-lines-per-call"),
        help: "Emitted lines sent to Redis in one sequencing-script call (1 to 64; more costs Redis less per line).")
    var redisLinesPerCall: Int = ClusterPublisherConfiguration.defaultLinesPerCall

    @Option(
        name: .customLong("node-name"),
        help: "This relay's name in logs and in Redis (default host name and port; a random suffix is added).")
    var nodeName: String?

    func run() async throws {
        let settings = try checkedSettings()
        // A write to a closed pipe (standard output of `serve --dev | head`, say) must be an
        // error the relay can ignore, not a signal that kills it and leaves its socket file.
        signal(SIGPIPE, SIG_IGN)
        let logger = Self.bootstrapLogging(level: settings.logLevel)
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        raiseOpenFilesLimit(logger: logger)

        let keys: [ConfiguredKey]
        var mintingSecret: [UInt8]?
        if settings.keyFiles.files.isEmpty {
            let secret = DevMode.randomSecret()
            mintingSecret = secret
            keys = [ConfiguredKey(id: "dev", key: .secret(secret))]
        } else {
            keys = try await settings.keyFiles.verifierKeys()
            if dev, case .secret(let secret) = keys[0].key { mintingSecret = secret }
        }
        let verifier: TokenVerifier
        do {
            verifier = try await TokenVerifier(keys: keys, rules: settings.tokenRules)
        } catch {
            throw CLIError.usage("\(error)")
        }
        let metrics = RelayMetrics()
        metrics.setKeyCount(verifier.keyCount)

        var configuration = settings.configuration
        if maxConnections == nil { configuration.httpEdge.maxConnections = Self.defaultMaxConnections() }
        do {
            if let activation = try SocketActivation.fromEnvironment() {
                configuration.adoptedIngestDescriptor = activation.ingestDescriptor
                configuration.adoptedHTTPDescriptor = activation.httpDescriptor
                logger.info(
                    "sockets from systemd",
                    metadata: [
                        "ingest": "\(activation.ingestDescriptor.map(String.init) ?? "none")",
                        "http": "\(activation.httpDescriptor.map(String.init) ?? "none")",
                    ])
            }
        } catch {
            throw CLIError.usage("\(error)")
        }

        let socketPath = configuration.socketPath
        let devSecret = mintingSecret
        let relayConfiguration = configuration
        // The relay starts inside the service group, once signals are handled: listening first
        // would let a flood of connections take every descriptor before the signal handler gets
        // its own (libdispatch blocks SIGTERM and then fails to make its signalfd: seen in
        // test_limits), and the relay could then no longer be stopped.
        let service = RelayService(
            start: {
                do {
                    return try await Relay.start(
                        configuration: relayConfiguration, verifier: verifier, metrics: metrics,
                        metricsText: { registry.emitToString() }, notifier: SystemdNotifier.fromEnvironment(),
                        logger: logger)
                } catch let error as RelayStartError {
                    throw CLIError.usage("\(error)")
                } catch {
                    throw CLIError.failure("\(error)")
                }
            },
            started: { relay in
                relay.markReady()
                guard let devSecret else { return }
                do {
                    try await DevMode.printBanner(secret: devSecret, relay: relay, socketPath: socketPath)
                } catch {
                    logger.error("could not mint the development token", metadata: ["error": "\(error)"])
                }
            })
        if allowTokensWithoutExp {
            logger.warning("--allow-tokens-without-exp: tokens without exp are accepted and never expire")
        }
        // SIGHUP reloads every key file (it would otherwise end the relay, exit 129, without its
        // state). A file that fails keeps the old keys: the relay says why and serves on.
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let keyFiles = settings.keyFiles
        let hangupTask = Task {
            for await _ in hangups {
                await Self.reloadKeys(keyFiles, verifier: verifier, metrics: metrics, logger: logger)
            }
        }
        defer { hangupTask.cancel() }
        let services = ServiceGroup(
            configuration: .init(
                services: [.init(service: service)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await services.run()
    }

    private struct Settings {
        var configuration: RelayConfiguration
        var tokenRules: TokenRules
        var keyFiles: KeyFiles
        var logLevel: Logger.Level
    }

    /// SIGHUP: every key file read again and swapped in at once, or none.
    private static func reloadKeys(_ files: KeyFiles, verifier: TokenVerifier, metrics: RelayMetrics, logger: Logger) async {
        guard !files.files.isEmpty else {
            return logger.notice("SIGHUP received: no key file to reload (--dev's secret lives in memory); still serving")
        }
        do {
            try await verifier.replaceKeys(try await files.verifierKeys())
            metrics.setKeyCount(verifier.keyCount)
            logger.notice("SIGHUP received: keys reloaded", metadata: ["keys": "\(verifier.keyIDs.joined(separator: ","))"])
        } catch {
            let why = (error as? CLIError)?.message ?? "\(error)"
            logger.error("SIGHUP received: keys NOT reloaded, the old keys stay", metadata: ["why": "\(why)"])
        }
    }

    /// Every flag checked before anything starts: a mistake is one line naming the flag, exit status 2.
    private func checkedSettings() throws -> Settings {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw CLIError.usage("--log-level \(logLevel): expected trace, debug, info, notice, warning or error")
        }
        guard let mode = UInt32(socketMode, radix: 8), mode <= 0o777 else {
            throw CLIError.usage("--socket-mode \(socketMode): expected octal permissions such as 0660")
        }
        guard let (host, port) = Self.hostAndPort(listen) else {
            throw CLIError.usage("--listen \(listen): expected HOST:PORT, e.g. \(Self.defaultListen)")
        }
        if !jwtSecretFiles.isEmpty, !jwtPublicKeyFiles.isEmpty {
            throw CLIError.usage("--jwt-secret-file and --jwt-public-key-file: give one key, not both")
        }
        if jwtSecretFiles.isEmpty, jwtPublicKeyFiles.isEmpty, !dev {
            throw CLIError.usage(
                "no key: give --jwt-secret-file or --jwt-public-key-file (or --dev to try it out); the relay never runs unauthenticated")
        }
        if dev, !jwtPublicKeyFiles.isEmpty {
            throw CLIError.usage("--dev mints tokens and needs a secret: drop --jwt-public-key-file")
        }
        if dev, !Self.isLoopback(host) {
            throw CLIError.usage("--listen \(listen): --dev serves loopback only (127.0.0.1, ::1 or localhost)")
        }
        let keyFiles = try KeyFiles(secretFiles: jwtSecretFiles, publicKeyFiles: jwtPublicKeyFiles, kidRules: jwtKids)
        guard (0...TokenLimits.maxLeeway).contains(jwtLeeway) else {
            throw CLIError.usage("--jwt-leeway \(jwtLeeway): expected 0 to \(TokenLimits.maxLeeway) seconds")
        }
        for (flag, value) in [("--jwt-audience", jwtAudience), ("--jwt-issuer", jwtIssuer)] where value?.isEmpty == true {
            throw CLIError.usage("\(flag): must not be empty (leave the flag out to accept any)")
        }
        var origins = Set<WebOrigin>()
        for value in allowOrigins {
            guard let origin = WebOrigin(value) else {
                let hint = value.hasSuffix("/") ? "; an origin has no path: drop the trailing /" : ""
                throw CLIError.usage(
                    "--allow-origin \(value): expected scheme://host[:port], e.g. https://app.example.com\(hint)")
            }
            origins.insert(origin)
        }
        var templates = [GrantTemplate]()
        for grant in grants {
            guard let template = GrantTemplate(grant) else {
                throw CLIError.usage("--grant \(grant): expected a topic or a prefix pattern ending in *, e.g. user:{sub}:*")
            }
            templates.append(template)
        }
        // Names are resolved here, once, before anything serves (NSS may block; no loop runs yet).
        var publishRules = [PublishGrantRule]()
        for value in publishGrants {
            do {
                let spec = try PublishGrantSpec(parsing: value)
                publishRules.append(
                    try spec.resolved(uidOfUser: SystemAccounts.uid(ofUser:), gidOfGroup: SystemAccounts.gid(ofGroup:)))
            } catch {
                throw CLIError.usage("--publish-grant \(value): \(error)")
            }
        }
        for (flag, value, minimum) in [
            ("--history", history, 0), ("--max-event-bytes", maxEventBytes, 16), ("--max-outbound-bytes", maxOutboundBytes, 1024),
            ("--max-inflight-bytes", maxInflightBytes, 1024),
            ("--max-topics", maxTopics, 1), ("--max-subscriptions", maxSubscriptions, 1),
            ("--max-history-bytes", maxHistoryBytes, 65536),
            ("--max-pattern-subscriptions", maxPatternSubscriptions, 0),
            ("--max-pattern-subscriptions-total", maxPatternSubscriptionsTotal, 0),
        ] where value < minimum {
            throw CLIError.usage("\(flag) \(value): must be at least \(minimum)")
        }
        guard (0...3_600_000).contains(sseRetry) else {
            throw CLIError.usage("--sse-retry \(sseRetry): must be 0 to 3600000 milliseconds")
        }
        guard pingInterval > 0, pingInterval.isFinite else {
            throw CLIError.usage("--ping-interval \(pingInterval): must be a positive number of seconds")
        }
        guard topicTTL > 0, topicTTL.isFinite else {
            throw CLIError.usage("--topic-ttl \(topicTTL): must be a positive number of seconds")
        }
        let emitterLimits = try checkedEmitterLimits()
        let httpEdge = try checkedHTTPEdge()
        var configuration = RelayConfiguration(
            socketPath: socket ?? (dev ? DevMode.socketPath() : RelayConfiguration.defaultSocketPath),
            socketMode: mode,
            listenHost: host,
            listenPort: port,
            allowedOrigins: origins,
            maxEventBytes: maxEventBytes,
            maxOutboundBytes: maxOutboundBytes,
            maxSubscriptions: maxSubscriptions,
            maxPatternSubscriptions: maxPatternSubscriptions,
            pingInterval: .nanoseconds(Int64(pingInterval * 1e9)),
            stateFile: stateFile,
            hub: HubConfiguration(
                historyLimit: history, maxTopics: maxTopics, topicTTL: UInt64(topicTTL * 1e9),
                maxPatternSubscriptions: maxPatternSubscriptionsTotal, maxHistoryBytes: maxHistoryBytes),
            ingestBudgetBytes: maxInflightBytes,
            cluster: try clusterSettings(port: port),
            publishPolicy: publishRules.isEmpty ? nil : PublishPolicy(rules: publishRules),
            emitterLimits: emitterLimits,
            httpEdge: httpEdge)
        configuration.sseRetryMilliseconds = sseRetry
        let rules = TokenRules(
            grantTemplates: templates, allowsMissingExpiry: allowTokensWithoutExp, audience: jwtAudience, issuer: jwtIssuer,
            leeway: jwtLeeway)
        return Settings(configuration: configuration, tokenRules: rules, keyFiles: keyFiles, logLevel: level)
    }

    /// `--max-emitters`, `--max-emitters-per-uid` and the emitter timeouts.
    private func checkedEmitterLimits() throws -> EmitterLimitSettings {
        guard maxEmitters >= 1 else { throw CLIError.usage("--max-emitters \(maxEmitters): must be at least 1") }
        let perUID = maxEmittersPerUID ?? min(EmitterLimitSettings.defaultMaxEmittersPerUID, maxEmitters)
        guard (1...maxEmitters).contains(perUID) else {
            throw CLIError.usage(
                "--max-emitters-per-uid \(perUID): expected 1 to --max-emitters (\(maxEmitters))")
        }
        for (flag, value) in [
            ("--emitter-idle-timeout", emitterIdleTimeout), ("--emitter-partial-line-timeout", emitterPartialLineTimeout),
        ] where !(value > 0 && value.isFinite && value <= 31_536_000) {
            throw CLIError.usage("\(flag) \(value): must be a positive number of seconds (at most a year)")
        }
        return EmitterLimitSettings(
            maxEmitters: maxEmitters, maxEmittersPerUID: perUID,
            idleTimeout: .nanoseconds(Int64(emitterIdleTimeout * 1e9)),
            partialLineTimeout: .nanoseconds(Int64(emitterPartialLineTimeout * 1e9)))
    }

    /// `--max-connections`, `--max-connections-per-ip`, `--trusted-proxy`, `--handshake-timeout`.
    private func checkedHTTPEdge() throws -> HTTPEdgeSettings {
        if let maxConnections, maxConnections < 1 {
            throw CLIError.usage("--max-connections \(maxConnections): must be at least 1")
        }
        guard maxConnectionsPerIP >= 1 else {
            throw CLIError.usage("--max-connections-per-ip \(maxConnectionsPerIP): must be at least 1")
        }
        var networks = [IPNetwork]()
        for value in trustedProxies {
            guard let network = IPNetwork(value) else {
                throw CLIError.usage(
                    "--trusted-proxy \(value): expected an IP address or a CIDR range, e.g. 10.0.0.0/8 or fd00::/8")
            }
            networks.append(network)
        }
        guard handshakeTimeout > 0, handshakeTimeout <= 3600, handshakeTimeout.isFinite else {
            throw CLIError.usage("--handshake-timeout \(handshakeTimeout): expected a number of seconds above 0, at most 3600")
        }
        return HTTPEdgeSettings(
            maxConnections: maxConnections ?? HTTPEdgeSettings.fallbackMaxConnections,
            maxConnectionsPerAddress: maxConnectionsPerIP,
            trustedProxies: networks.isEmpty ? IPNetwork.loopback : networks,
            handshakeTimeout: .nanoseconds(Int64(handshakeTimeout * 1e9)))
    }

    /// Descriptors `--max-connections` leaves by default for emitters, the listeners and the relay's own files.
    private static let reservedDescriptors = 1024

    /// The soft open files limit (after `raiseOpenFilesLimit`) less `reservedDescriptors`, at least
    /// `fallbackMaxConnections`: past it accept would fail with EMFILE, which refuses silently; a
    /// 503 says why.
    private static func defaultMaxConnections() -> Int {
        guard let limit = try? SystemCalls.openFilesLimit(), limit.rlim_cur != rlim_t.max else {
            return 1_048_576
        }
        let soft = Int(clamping: limit.rlim_cur)
        return max(HTTPEdgeSettings.fallbackMaxConnections, soft - reservedDescriptors)
    }

    /// `--redis` and its companions; nil without `--redis`.
    private func clusterSettings(port: Int) throws -> ClusterSettings? {
        // The companions are ignored without it: an environment file may set them for every host.
        guard let redis else { return nil }
        let endpoint: RedisEndpoint
        do {
            endpoint = try RedisEndpoint(parsing: redis)
        } catch {
            throw CLIError.usage("--redis: \(error)")
        }
        guard Self.isClusterName(redisPrefix, maximumLength: 64) else {
            throw CLIError.usage(
                "--redis-prefix \(redisPrefix): expected 1 to 64 of A-Z a-z 0-9 _ - . : / @ = (it starts every key and channel)")
        }
        guard redisQueueBytes >= 65536 else {
            throw CLIError.usage("--redis-queue-bytes \(redisQueueBytes): must be at least 65536")
        }
        guard (1...64).contains(redisLinesPerCall) else {
            throw CLIError.usage("--redis-lines-per-call \(redisLinesPerCall): expected 1 to 64")
        }
        let base = nodeName ?? (ProcessInfo.processInfo.hostName + ":" + String(port))
        guard Self.isClusterName(base, maximumLength: 100) else {
            throw CLIError.usage("--node-name \(base): expected 1 to 100 of A-Z a-z 0-9 _ - . : / @ =")
        }
        // Per process: a restarted relay numbers its lines from 1 again under a new counter key.
        let alphabet = Array("0123456789abcdefghijklmnopqrstuvwxyz")
        let suffix = String((0..<6).map { _ in alphabet.randomElement()! })
        return ClusterSettings(
            endpoint: endpoint, prefix: redisPrefix, queueBytes: redisQueueBytes, linesPerCall: redisLinesPerCall,
            nodeName: base + "-" + suffix)
    }

    /// Names that go into Redis keys and channel patterns: topic characters only (no glob characters, no braces).
    static func isClusterName(_ name: String, maximumLength: Int) -> Bool {
        !name.isEmpty && name.utf8.count <= maximumLength && name.utf8.allSatisfy(TopicName.isTopicByte)
    }

    static func hostAndPort(_ text: String) -> (String, Int)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            return nil
        }
        if host != "localhost", (try? SocketAddress(ipAddress: host, port: port)) == nil { return nil }
        return (host, port)
    }

    static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host.hasPrefix("127.")
    }

    private static func bootstrapLogging(level: Logger.Level) -> Logger {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "progress-relay")
    }

    /// Many subscribers need many descriptors: take the whole hard limit.
    private func raiseOpenFilesLimit(logger: Logger) {
        guard var limit = try? SystemCalls.openFilesLimit(), limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        do {
            try SystemCalls.setOpenFilesLimit(limit)
        } catch {
            logger.warning("could not raise the open files limit", metadata: ["error": "\(error)"])
        }
    }
}

/// The relay as a service: starts it, runs until a graceful shutdown is asked for, then drains.
struct RelayService: Service {
    let start: @Sendable () async throws -> Relay
    /// Runs once the relay serves: readiness is announced only then.
    let started: @Sendable (Relay) async -> Void

    func run() async throws {
        let relay = try await start()
        await started(relay)
        try? await gracefulShutdown()
        // The contract promises an exit within 5 s; should a step ever hang, say so and go.
        let deadline = Thread {
            Thread.sleep(forTimeInterval: 6)
            FileHandle.standardError.write(Data("progress-relay: shutdown did not finish within 6 s; exiting\n".utf8))
            exit(1)
        }
        deadline.start()
        do {
            try await relay.shutdown()
        } catch {
            throw CLIError.failure("\(error)")
        }
    }
}
