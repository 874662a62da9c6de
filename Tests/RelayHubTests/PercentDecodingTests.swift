// PercentDecodingTests: the one `%XX` decoder of the relay (query strings, `/topics/` path
// segments, `--redis` user information): a malformed escape is an error, never dropped.

import RelayHub
import Testing

@Suite struct PercentDecodingTests {
    @Test(arguments: [
        ("plain", "plain"), ("", ""), ("a%20b", "a b"), ("task%3A42", "task:42"), ("a%2Fb", "a/b"),
        ("%41%62", "Ab"), ("%c3%a9", "é"), ("%C3%A9", "é"), ("%E2%82%AC", "€"), ("%F0%9F%98%80", "😀"),
        ("%2B", "+"), ("%25", "%"), ("%2525", "%25"), ("é", "é"),
    ])
    func wellFormedEscapesDecode(input: String, expected: String) {
        #expect(PercentDecoding.decode(input) == expected)
        #expect(PercentDecoding.decode(input, plusAsSpace: true) == expected)
    }

    @Test func plusIsASpaceOnlyInAQuery() {
        #expect(PercentDecoding.decode("a+b") == "a+b")
        #expect(PercentDecoding.decode("a+b", plusAsSpace: true) == "a b")
        #expect(PercentDecoding.decode("a%2Bb", plusAsSpace: true) == "a+b")
    }

    @Test(arguments: [
        "%", "a%", "%4", "a%4", "%zz", "%4z", "%z4", "%%41", "% 41", "%-1", "%+1",
        // Escapes whose bytes are not UTF-8: a lone continuation byte, a lead without its
        // continuation, an overlong form, a surrogate, beyond U+10FFFF.
        "%FF", "%80", "%C3", "%C3x", "%C0%AF", "%ED%A0%80", "%F4%90%80%80",
    ])
    func malformedEscapesAreErrors(input: String) {
        #expect(PercentDecoding.decode(input) == nil)
        #expect(PercentDecoding.decode(input, plusAsSpace: true) == nil)
    }

    @Test func aSubstringDecodesAsItsOwnText() {
        let text = "x=%41&y=%zz"
        let first = text.split(separator: "&")[0].dropFirst(2)
        let second = text.split(separator: "&")[1].dropFirst(2)
        #expect(PercentDecoding.decode(first) == "A")
        #expect(PercentDecoding.decode(second) == nil)
    }
}
