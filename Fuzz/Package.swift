// swift-tools-version:6.0
// The fuzzers of ProgressRelay: one libFuzzer executable per parser that faces
// untrusted bytes. A package of its own, so that the root's `swift build` and
// `swift test` never compile it; the checks each harness runs are in the root's
// FuzzChecks target (so FuzzRegressionTests replays saved inputs through them).
// Build and run with scripts/fuzz, or by hand as Fuzz/README.md says: only the
// flags given there make a binary that fuzzes.
import PackageDescription

/// A harness: one file holding `@_cdecl("LLVMFuzzerTestOneInput")`, and no `main` (libFuzzer's).
func harness(_ name: String) -> Target {
    .executableTarget(name: name, dependencies: [.product(name: "FuzzChecks", package: "ProgressRelay")])
}

let package = Package(
    name: "ProgressRelayFuzz",
    platforms: [.macOS(.v14)],
    dependencies: [
        // Named: with a bare path SwiftPM names the package after its folder, which differs between checkouts.
        .package(name: "ProgressRelay", path: "..")
    ],
    targets: [
        harness("FuzzIngestLine"),
        harness("FuzzClientFrame"),
        harness("FuzzToken"),
        harness("FuzzRESP"),
    ],
    swiftLanguageModes: [.v6]
)
