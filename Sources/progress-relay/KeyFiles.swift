// KeyFiles: reading `--jwt-secret-file` and `--jwt-public-key-file`, with the
// reason a file cannot be read (missing, permission, a directory) in the one
// line the user sees; which kid each file is; reading them all again on SIGHUP.

import RelayAuth
import RelayServer

#if canImport(Glibc)
import Glibc
#endif

enum KeyFile {
    /// The whole file, or a usage error naming the flag and why it cannot be read.
    static func read(_ path: String, flag: String) throws -> [UInt8] {
        let bytes: [UInt8]
        do {
            let fd = try SystemCalls.open(path, O_RDONLY)
            defer { SystemCalls.close(fd) }
            if let status = try? SystemCalls.fstat(fd), (status.st_mode & S_IFMT) == S_IFDIR {
                throw CLIError.usage("\(flag) \(path): is a directory, not a key file")
            }
            // Keys are small; a huge file is a wrong path (a log, a device).
            bytes = try SystemCalls.readToEnd(fd, .path(path), limit: 1 << 20)
        } catch let error as SystemCallError {
            throw CLIError.usage("\(flag) \(path): cannot read the file: \(reason(error))")
        }
        if bytes.count > 1 << 20 { throw CLIError.usage("\(flag) \(path): larger than 1 MiB, not a key file") }
        return bytes
    }

    private static func reason(_ error: SystemCallError) -> String {
        switch error.code {
        case ENOENT: return "no such file"
        case EACCES: return "permission denied (the relay runs as uid \(getuid()))"
        default: return error.reason
        }
    }
}

enum SecretFile {
    /// The file's bytes with one trailing newline removed.
    static func read(_ path: String, flag: String) throws -> [UInt8] {
        var bytes = try KeyFile.read(path, flag: flag)
        if bytes.last == UInt8(ascii: "\n") { bytes.removeLast() }
        if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
        guard !bytes.isEmpty else { throw CLIError.usage("\(flag) \(path): the file is empty") }
        return bytes
    }
}

/// The key files of `serve`, read at start and again on SIGHUP: each one's `kid` is its file
/// name without extension unless `--jwt-kid FILE=KID` names it.
struct KeyFiles: Sendable {
    enum Kind: Sendable { case secret, publicKey }

    struct File: Sendable {
        var path: String
        var kind: Kind
        var id: String
        var flag: String { kind == .secret ? "--jwt-secret-file" : "--jwt-public-key-file" }
    }

    let files: [File]

    /// Checks the flags' shape (at most two files of a kind, known `--jwt-kid` files, distinct kids).
    init(secretFiles: [String], publicKeyFiles: [String], kidRules: [String]) throws {
        for (flag, paths) in [("--jwt-secret-file", secretFiles), ("--jwt-public-key-file", publicKeyFiles)] where paths.count > 2 {
            throw CLIError.usage("\(flag): given \(paths.count) times; at most twice (the new key and the one being retired)")
        }
        var named = [String: String]()
        let all = secretFiles.map { ($0, Kind.secret) } + publicKeyFiles.map { ($0, Kind.publicKey) }
        for rule in kidRules {
            guard let equals = rule.lastIndex(of: "="), equals != rule.startIndex else {
                throw CLIError.usage("--jwt-kid \(rule): expected FILE=KID, FILE one of the key files")
            }
            let file = String(rule[..<equals])
            let kid = String(rule[rule.index(after: equals)...])
            guard Self.isKeyID(kid) else {
                throw CLIError.usage("--jwt-kid \(rule): the kid must be 1 to 128 printable ASCII characters without spaces")
            }
            let matches = all.filter { $0.0 == file || Self.fileName($0.0) == file }
            guard matches.count == 1 else {
                throw CLIError.usage(
                    matches.isEmpty
                        ? "--jwt-kid \(rule): \(file) is not a --jwt-secret-file or --jwt-public-key-file"
                        : "--jwt-kid \(rule): \(file) names more than one key file; give its path")
            }
            named[matches[0].0] = kid
        }
        var files = [File]()
        var seen = [String: String]()
        for (path, kind) in all {
            let id = named[path] ?? Self.defaultID(path)
            guard Self.isKeyID(id) else {
                throw CLIError.usage(
                    "\(kind == .secret ? "--jwt-secret-file" : "--jwt-public-key-file") \(path): the file name makes no usable kid; name one with --jwt-kid \(path)=KID")
            }
            if let other = seen[id] {
                throw CLIError.usage("\(other) and \(path): both have kid \(id); name one with --jwt-kid FILE=KID")
            }
            seen[id] = path
            files.append(File(path: path, kind: kind, id: id))
        }
        self.files = files
    }

    /// Every file read and checked; the first that fails is the error (naming the flag and file).
    func load() throws -> [ConfiguredKey] {
        try files.map { file in
            switch file.kind {
            case .secret:
                let secret = try SecretFile.read(file.path, flag: file.flag)
                guard secret.count >= TokenLimits.secretBytes else {
                    throw CLIError.usage(
                        "\(file.flag) \(file.path): the secret is \(secret.count) bytes, too short: HS256 needs at least 32 "
                            + "(HS384 48, HS512 64). Make a good one: (umask 077; head -c 32 /dev/urandom | base64 > \(file.path))")
                }
                return ConfiguredKey(id: file.id, key: .secret(secret))
            case .publicKey:
                let pem = try KeyFile.read(file.path, flag: file.flag)
                return ConfiguredKey(id: file.id, key: .publicKeyPEM(String(decoding: pem, as: UTF8.self)))
            }
        }
    }

    /// A verifier needs these, checked like the files (a PEM that is not a public key names its file).
    func verifierKeys() async throws -> [ConfiguredKey] {
        let keys = try load()
        for (file, key) in zip(files, keys) {
            do {
                try await TokenVerifier.check(key.key)
            } catch {
                throw CLIError.usage("\(file.flag) \(file.path): \(error)")
            }
        }
        return keys
    }

    static func fileName(_ path: String) -> String {
        String(path.split(separator: "/", omittingEmptySubsequences: true).last ?? Substring(path))
    }

    /// `relay-2026.secret` → `relay-2026`; a leading dot is part of the name.
    static func defaultID(_ path: String) -> String {
        let name = fileName(path)
        guard let dot = name.lastIndex(of: "."), dot != name.startIndex else { return name }
        return String(name[..<dot])
    }

    static func isKeyID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 128 && id.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F }
    }
}
