// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "ProgressRelay",
    // The relay (`progress-relay`, RelayServer) runs on Linux only: socket activation,
    // SO_PEERCRED/SO_PEERGROUPS and Glibc. The macOS entry is for the ProgressEmitter library,
    // which keeps to Foundation and the C library (Glibc or Darwin).
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "progress-relay", targets: ["progress-relay"]),
        .library(name: "ProgressEmitter", targets: ["ProgressEmitter"]),
        // For the fuzzing package in Fuzz/ only (its harnesses import it); not an API for users.
        .library(name: "FuzzChecks", targets: ["FuzzChecks"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "4.1.0"..<"6.0.0"),
    ],
    targets: [
        // Topics, sequence numbers, history, grants: plain Swift, no I/O.
        .target(
            name: "RelayHub",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")]
        ),
        // Token verification and minting.
        .target(
            name: "RelayAuth",
            dependencies: [
                "RelayHub",
                .product(name: "JWTKit", package: "jwt-kit"),
            ]
        ),
        // NIO transports around the hub: Unix-socket ingest, HTTP, WebSocket subscribers, and
        // cluster mode's coordination between Redis and the hub.
        .target(
            name: "RelayServer",
            dependencies: [
                "RelayHub",
                "RelayAuth",
                "RelayCluster",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            // The live page and the browser client, served at `/` and `/progress-relay.js`
            // (symbolic links to clients/js, where they are developed and tested).
            resources: [.embedInCode("Resources/live.html"), .embedInCode("Resources/progress-relay.js")]
        ),
        // RESP2 for the Redis connections of cluster mode: command encoder, incremental reply decoder.
        .target(name: "RESP", dependencies: [.product(name: "NIOCore", package: "swift-nio")]),
        // Cluster mode over Redis: the command connection and the sequencing script.
        .target(
            name: "RelayCluster",
            dependencies: [
                "RESP",
                "RelayHub",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The emitter that workers link: Foundation and the C library only.
        .target(name: "ProgressEmitter"),
        // `progress-relay watch`: the WebSocket client, the resume state machine, the renderer.
        .target(
            name: "RelayWatch",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // The CLI: parses flags and wires the pieces together.
        .executableTarget(
            name: "progress-relay",
            dependencies: [
                "RelayServer",
                "RelayAuth",
                "RelayCluster",
                "ProgressEmitter",
                "RelayWatch",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]
        ),
        // What `emit` costs a worker: a benchmark that prints figures.
        .executableTarget(name: "emitter-bench", dependencies: ["ProgressEmitter"]),
        // What the fuzzers in Fuzz/ check on each input (oracles and invariants), in the root package
        // so that FuzzRegressionTests replays the saved inputs through the same functions.
        .target(
            name: "FuzzChecks",
            dependencies: [
                "RelayHub",
                "RelayAuth",
                "RelayServer",
                "RESP",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // Fuzz/regressions and Fuzz/seeds through FuzzChecks: a crash the fuzzer found stays fixed.
        .testTarget(name: "FuzzRegressionTests", dependencies: ["FuzzChecks"]),
        .testTarget(name: "RelayHubTests", dependencies: ["RelayHub"]),
        .testTarget(name: "RelayAuthTests", dependencies: ["RelayAuth"]),
        .testTarget(name: "ProgressEmitterTests", dependencies: ["ProgressEmitter"]),
        .testTarget(name: "RelayWatchTests", dependencies: ["RelayWatch"]),
        // The transport layer in memory: handlers in an EmbeddedChannel, parsers, flag tables.
        .testTarget(
            name: "RelayServerTests",
            dependencies: [
                "RelayServer",
                "RelayHub",
                "RelayAuth",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The CLI's tables checked against its commands (an executable target, imported with @testable).
        .testTarget(
            name: "ProgressRelayCommandTests",
            dependencies: ["progress-relay", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        // Test support: a redis-server of a test's own, for the tests that talk to Redis.
        .target(name: "RedisTestSupport", path: "Tests/RedisTestSupport"),
        .testTarget(name: "RESPTests", dependencies: ["RESP", "RedisTestSupport"]),
        .testTarget(
            name: "RelayClusterTests",
            dependencies: [
                "RelayCluster",
                "RESP",
                "RedisTestSupport",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)

// Every warning in the project's own code is an error (SE-0443, tools 6.2); dependencies keep
// their warnings.
for target in package.targets where target.type != .plugin {
    target.swiftSettings = (target.swiftSettings ?? []) + [.treatAllWarnings(as: .error)]
}
