// DevMode: `serve --dev`, a relay to try out with nothing set up.
//
// Its files are per user: a shared name in /tmp would let one user's relay
// unlink another's socket or read a secret another user's file holds. With
// `$XDG_RUNTIME_DIR` (a private directory) they go there; otherwise into the
// temporary directory with the uid in their names.

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

    /// `serve`'s default socket when this user may create it (root), else a path of this user's own.
    static func socketPath() -> String {
        let standard = RelayConfiguration.defaultSocketPath
        let directory = String(standard[..<(standard.lastIndex(of: "/") ?? standard.startIndex)])
        if access(directory, W_OK) == 0 { return standard }
        return ownPath("progress-relay.sock")
    }

    /// Where the secret is written for `progress-relay token`.
    static func secretPath() -> String { ownPath("progress-relay-dev-secret") }

    /// `$XDG_RUNTIME_DIR/<name>` when that directory is this user's, else `$TMPDIR/<stem>-<uid><ext>`.
    static func ownPath(_ name: String) -> String {
        let environment = ProcessInfo.processInfo.environment
        if let runtime = environment["XDG_RUNTIME_DIR"], !runtime.isEmpty {
            if let status = try? SystemCalls.stat(runtime), (status.st_mode & S_IFMT) == S_IFDIR,
                status.st_uid == getuid(), access(runtime, W_OK) == 0
            {
                return runtime + "/" + name
            }
        }
        let directory = environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        let (stem, ext) = name.hasSuffix(".sock") ? (String(name.dropLast(5)), ".sock") : (name, "")
        return "\(directory)/\(stem)-\(getuid())\(ext)"
    }

    /// Writes `secret` to `path`, mode 0600, replacing only a regular file of this user's own:
    /// never through a symbolic link, never into another user's file. Returns why it could not.
    static func writeSecret(_ secret: [UInt8], to path: String) -> String? {
        if let status = try? SystemCalls.lstat(path) {
            guard (status.st_mode & S_IFMT) == S_IFREG, status.st_uid == getuid() else {
                return "\(path) exists and is not a file of this user's (uid \(getuid()))"
            }
            do {
                try SystemCalls.unlink(path)
            } catch {
                return "\(path): cannot replace it: \(error.reason)"
            }
        }
        do {
            let fd = try SystemCalls.open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600)
            defer { SystemCalls.close(fd) }
            try SystemCalls.writeAll(fd, secret, .path(path))
        } catch {
            return "\(path): \(error.reason)"
        }
        return nil
    }

    /// Prints the secret, a token granting `*`, and commands to try. Never stops the relay: a
    /// closed or full standard output only loses the banner (said on standard error).
    static func printBanner(secret: [UInt8], relay: Relay, socketPath: String) async throws {
        let token = try await TokenMinter.hs256(secret: secret, subject: "dev", topics: ["*"], ttl: 86400)
        let secretPath = secretPath()
        let secretProblem = writeSecret(secret, to: secretPath)
        let port = relay.httpAddress.port ?? relay.configuration.listenPort
        var host = relay.configuration.listenHost
        if host.contains(":") { host = "[\(host)]" }
        let base = "\(host):\(port)"
        let socket = relay.configuration.adoptedIngestDescriptor == nil ? socketPath : "(systemd socket)"
        let secretText = String(decoding: secret, as: UTF8.self)
        let mint =
            secretProblem == nil
            ? "  progress-relay token --jwt-secret-file \(secretPath) --sub alice --topic 'task:*' --ttl 1h"
            : "  (the secret could not be written: \(secretProblem!); put the secret above in a file of yours)"
        let text = """
            progress-relay is running in development mode (loopback only, random secret).

              secret:  \(secretText)\(secretProblem == nil ? "   (also in \(secretPath))" : "")
              token:   \(token)
                       sub "dev", topics ["*"], valid 24 hours
              page:    http://\(base)/?token=\(token)
              ws:      ws://\(base)/ws?token=\(token)&topic=demo

            Send an event:
              printf '{"topic":"demo","type":"progress","progress":50,"message":"half way"}\\n' | socat - UNIX-CONNECT:\(socket)
              progress-relay emit --socket \(socket) --topic demo --type progress --field progress=50
            Mint another token:
            \(mint)

            """
        // Straight to the descriptor: nothing waits in a buffer, terminal or not.
        // SIGPIPE is ignored by `serve`, so a closed pipe is EPIPE here.
        do {
            try SystemCalls.writeAll(STDOUT_FILENO, Array(text.utf8))
        } catch {
            try? SystemCalls.writeAll(
                STDERR_FILENO, Array("progress-relay: could not print the --dev banner: \(error.reason)\n".utf8))
        }
        if let secretProblem {
            try? SystemCalls.writeAll(
                STDERR_FILENO, Array("progress-relay: --dev: could not write the secret: \(secretProblem)\n".utf8))
        }
    }
}
