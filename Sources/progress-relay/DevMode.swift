// DevMode: `serve --dev`, a relay to try out with nothing set up.

import Foundation
import RelayAuth
import RelayServer

#if canImport(Glibc)
import Glibc
#endif

enum DevMode {
    static func randomSecret() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        let hex = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        return Array(hex.utf8)
    }

    /// `/run/progress.sock` when this user may create it, else a path in the temporary directory.
    static func socketPath() -> String {
        if access("/run", W_OK) == 0 { return "/run/progress.sock" }
        let directory = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        return directory + "/progress-relay.sock"
    }

    /// Prints the secret, a token granting `*`, and commands to try; flushed at once.
    static func printBanner(secret: [UInt8], relay: Relay, socketPath: String) async throws {
        let token = try await TokenMinter.hs256(secret: secret, subject: "dev", topics: ["*"], ttl: 86400)
        let secretPath = NSTemporaryDirectory() + "progress-relay-dev-secret"
        _ = FileManager.default.createFile(atPath: secretPath, contents: Data(secret), attributes: [.posixPermissions: 0o600])
        let port = relay.httpAddress.port ?? 8765
        var host = relay.configuration.listenHost
        if host.contains(":") { host = "[\(host)]" }
        let base = "\(host):\(port)"
        let socket = relay.configuration.adoptedIngestDescriptor == nil ? socketPath : "(systemd socket)"
        let text = """
            progress-relay is running in development mode (loopback only, random secret).

              secret:  \(String(decoding: secret, as: UTF8.self))   (also in \(secretPath))
              token:   \(token)
                       sub "dev", topics ["*"], valid 24 hours
              page:    http://\(base)/?token=\(token)
              ws:      ws://\(base)/ws?token=\(token)&topic=demo

            Send an event:
              printf '{"topic":"demo","type":"progress","progress":50,"message":"half way"}\\n' | socat - UNIX-CONNECT:\(socket)
              progress-relay emit --socket \(socket) --topic demo --type progress --field progress=50
            Mint another token:
              progress-relay token --jwt-secret-file \(secretPath) --sub alice --topic 'task:*' --ttl 1h

            """
        // FileHandle writes straight to the descriptor: nothing waits in a buffer, terminal or not.
        FileHandle.standardOutput.write(Data(text.utf8))
    }
}
