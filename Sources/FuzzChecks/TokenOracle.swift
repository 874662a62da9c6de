// TokenOracle: the FuzzToken check. The pre-checks `TokenVerifier.verify` makes
// before any signature is checked (size, then the header read by the relay
// itself), and what follows them, on any token.
//
// The first byte of an input picks how the rest becomes a token:
//  * even: the rest is the token, as text (a `?token=` or a refresh op's token);
//  * odd: the rest is a header and a payload, JSON, split at the first newline,
//    which are base64url-encoded and signed with the verifier's own secret by
//    the header's HS algorithm, so that inputs get past the signature and the
//    claims and their rules are fuzzed too.
//
// Rules, on every input:
//  * over 8192 bytes: `tooLarge`, before anything is decoded;
//  * the header read (`TokenVerifier.header`) agrees with reading it again here
//    (a strict base64url decoder, then JSONSerialization): a header that reads
//    here reads there to the same alg and kid (the relay is lenient, not
//    stricter, about base64: it also takes `+`, `/` and padding);
//  * verify's answer is the header's error when there is one; then `unknownKey`
//    for a kid other than the configured one; then `algorithmNotAllowed` for an
//    alg the key is not for; only then may signatures and claims speak;
//  * a token signed with the key, with a header the relay reads, is never a
//    `badSignature`; when verify succeeds, the payload has the `sub`, an `exp`
//    after now and the `aud` it must have.

import Crypto
import Foundation
@_spi(Fuzzing) import RelayAuth
import Synchronization

enum TokenOracle {
    /// The verifier's only key: HS256, HS384 and HS512 (64 bytes), kid `key`.
    static let secret = [UInt8](repeating: 0x6B, count: 64)
    static let keyID = "key"
    static let audience = "relay"
    /// The fixed clock of every verification (2023-11-14).
    static let now = Date(timeIntervalSince1970: 1_700_000_000)

    private static let cached = Mutex<TokenVerifier?>(nil)

    static func verifier() async -> TokenVerifier {
        if let verifier = cached.withLock({ $0 }) { return verifier }
        let made: TokenVerifier
        do {
            made = try await TokenVerifier(
                keys: [ConfiguredKey(id: keyID, key: .secret(secret))],
                rules: TokenRules(audience: audience))
        } catch {
            fatalError("TokenOracle: the verifier cannot be made: \(error)")
        }
        cached.withLock { $0 = made }
        return made
    }

    static func check(_ input: [UInt8]) async throws(FuzzViolation) {
        let signed = input.first.map { $0 & 1 == 1 } ?? false
        let token = signed ? sign(Array(input.dropFirst())) : String(decoding: input.dropFirst(), as: UTF8.self)
        let result = await verifier().verify(token, now: now)
        let said = "token \(token.utf8.count <= 256 ? token.debugDescription : "(\(token.utf8.count) bytes)"): \(result)"

        if token.isEmpty {
            try require(result == .failure(.missing), "\(said): not missing")
            return
        }
        if token.utf8.count > 8192 {
            try require(result == .failure(.tooLarge("over 8192 bytes")), "\(said): not too large")
            return
        }
        let header = TokenVerifier.header(token)
        try checkHeader(token, header, said: said)
        let read: TokenVerifier.Header
        switch header {
        case .failure(let error):
            try require(result == .failure(error), "\(said): not the header's error, \(error)")
            return
        case .success(let header):
            read = header
        }
        if let kid = read.kid, kid != keyID {
            try require(result == .failure(.unknownKey), "\(said): kid \(kid.debugDescription) is no configured key")
            return
        }
        guard ["HS256", "HS384", "HS512"].contains(read.alg) else {
            try require(result == .failure(.algorithmNotAllowed(read.alg)), "\(said): alg \(read.alg.debugDescription)")
            return
        }
        guard signed else { return }
        try require(result != .failure(.badSignature), "\(said): signed with the key, yet a bad signature")
        // jwt-kit reads claims with JSONDecoder, which does not validate fields it skips: a payload
        // JSONSerialization rejects may verify. Only a payload both read is compared.
        if case .success(let principal) = result, let payload = payloadObject(token) {
            let exp = (payload["exp"] as? NSNumber)?.doubleValue
            let aud = payload["aud"]
            let audiences = (aud as? String).map { [$0] } ?? (aud as? [Any])?.compactMap { $0 as? String } ?? []
            try require(
                principal.subject == payload["sub"] as? String && !principal.subject.isEmpty,
                "\(said): subject \(principal.subject.debugDescription) is not the payload's sub")
            try require(exp.map { $0 > now.timeIntervalSince1970 } ?? false, "\(said): exp \(String(describing: exp))")
            try require(audiences.contains(audience), "\(said): aud \(String(describing: aud))")
        }
    }

    /// The relay's header read against a strict one: what reads strictly reads the same in the relay.
    static func checkHeader(_ token: String, _ header: Result<TokenVerifier.Header, TokenError>, said: String)
        throws(FuzzViolation)
    {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 else {
            try require(header == .failure(.malformed), "\(said): \(parts.count) parts, yet \(header)")
            return
        }
        guard let bytes = strictBase64URL(parts[0]),
            let object = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any]
        else { return }  // the relay may be more lenient
        guard let alg = object["alg"] as? String else {
            try require(header == .failure(.malformed), "\(said): no alg, yet \(header)")
            return
        }
        let expected: Result<TokenVerifier.Header, TokenError>
        if object["crit"] != nil {
            expected = .failure(.criticalHeader)
        } else if let kid = object["kid"], !(kid is String) {
            expected = .failure(.malformed)
        } else {
            expected = .success(TokenVerifier.Header(alg: alg, kid: object["kid"] as? String))
        }
        try require(header == expected, "\(said): header \(header), expected \(expected)")
    }

    /// RFC 4648 §5 base64url without padding, as JWTs use it; nil for anything else.
    static func strictBase64URL(_ text: Substring) -> [UInt8]? {
        var bits: UInt32 = 0
        var count = 0
        var output: [UInt8] = []
        for byte in text.utf8 {
            let value: UInt32
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): value = UInt32(byte - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): value = UInt32(byte - UInt8(ascii: "a")) + 26
            case UInt8(ascii: "0")...UInt8(ascii: "9"): value = UInt32(byte - UInt8(ascii: "0")) + 52
            case UInt8(ascii: "-"): value = 62
            case UInt8(ascii: "_"): value = 63
            default: return nil
            }
            bits = bits << 6 | value
            count += 6
            if count >= 8 {
                count -= 8
                output.append(UInt8(truncatingIfNeeded: bits >> UInt32(count)))
                bits &= (1 << UInt32(count)) - 1
            }
        }
        // A last group of one character (6 bits) encodes no byte: not base64.
        return count == 6 ? nil : output
    }

    static func base64URL(_ bytes: some Sequence<UInt8>) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    /// A token from `header \n payload`, signed with the key by the header's HS algorithm (HS256
    /// when the header names none of them).
    static func sign(_ rest: [UInt8]) -> String {
        let newline = rest.firstIndex(of: 0x0A) ?? rest.endIndex
        let header = rest[..<newline]
        let payload = newline < rest.endIndex ? rest[(newline + 1)...] : ArraySlice("{}".utf8)
        let signingInput = base64URL(header) + "." + base64URL(payload)
        let key = SymmetricKey(data: secret)
        let alg = (try? JSONSerialization.jsonObject(with: Data(header)) as? [String: Any])?["alg"] as? String
        let signature: [UInt8]
        switch alg {
        case "HS384": signature = Array(HMAC<SHA384>.authenticationCode(for: Data(signingInput.utf8), using: key))
        case "HS512": signature = Array(HMAC<SHA512>.authenticationCode(for: Data(signingInput.utf8), using: key))
        default: signature = Array(HMAC<SHA256>.authenticationCode(for: Data(signingInput.utf8), using: key))
        }
        return signingInput + "." + base64URL(signature)
    }

    /// The payload as JSONSerialization reads it; nil when it has duplicate top-level keys, of which
    /// jwt-kit's JSONDecoder keeps another than JSONSerialization (seen with `aud`), or a U+FEFF in a
    /// string, which JSONSerialization drops and JSONDecoder keeps.
    static func payloadObject(_ token: String) -> [String: Any]? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let bytes = strictBase64URL(parts[1]),
            let object = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any],
            ClientFrameOracle.topLevelKeyCount(bytes) == object.count,
            IngestLineOracle.replacingBOMsInStrings(bytes) == bytes  // JSONSerialization drops U+FEFF
        else { return nil }
        return object
    }
}
