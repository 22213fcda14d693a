using UblkSharp.Interop.GnuTls;

namespace UblkSharp.Tests.Interop;

/// <summary>The GnuTLS constants the PSK binding hard-codes, checked against the installed gnutls.h (libgnutls28-dev).</summary>
public class GnuTlsConstantsTests
{
    private static readonly (string C, long Cs)[] Constants =
    [
        ("GNUTLS_E_SUCCESS", GnuTls.GNUTLS_E_SUCCESS), ("GNUTLS_E_FATAL_ALERT_RECEIVED", GnuTls.GNUTLS_E_FATAL_ALERT_RECEIVED),
        ("GNUTLS_E_WARNING_ALERT_RECEIVED", GnuTls.GNUTLS_E_WARNING_ALERT_RECEIVED), ("GNUTLS_E_AGAIN", GnuTls.GNUTLS_E_AGAIN),
        ("GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER", GnuTls.GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER), ("GNUTLS_E_INTERRUPTED", GnuTls.GNUTLS_E_INTERRUPTED),
        ("GNUTLS_E_PUSH_ERROR", GnuTls.GNUTLS_E_PUSH_ERROR), ("GNUTLS_E_PULL_ERROR", GnuTls.GNUTLS_E_PULL_ERROR),
        ("GNUTLS_E_PREMATURE_TERMINATION", GnuTls.GNUTLS_E_PREMATURE_TERMINATION), ("GNUTLS_E_TIMEDOUT", GnuTls.GNUTLS_E_TIMEDOUT),
        ("GNUTLS_SERVER", GnuTls.GNUTLS_SERVER), ("GNUTLS_CLIENT", GnuTls.GNUTLS_CLIENT), ("GNUTLS_NO_SIGNAL", GnuTls.GNUTLS_NO_SIGNAL),
        ("GNUTLS_PSK_KEY_HEX", GnuTls.GNUTLS_PSK_KEY_HEX), ("sizeof(gnutls_datum_t)", sizeof(long) + sizeof(long)),
        ("GNUTLS_CRD_PSK", GnuTls.GNUTLS_CRD_PSK), ("GNUTLS_SHUT_WR", GnuTls.GNUTLS_SHUT_WR),
    ];

    [Fact]
    public void ConstantsMatchGnuTlsHeader()
    {
        // Through a signed type: the error codes are negative.
        var c = CHeader.Evaluate(["gnutls/gnutls.h"], Constants.Select((k, i) => ($"const{i}", $"(long long)({k.C})")));
        for (var i = 0; i < Constants.Length; i++)
        {
            var value = unchecked((long)c[$"const{i}"]);
            Assert.True(value == Constants[i].Cs, $"{Constants[i].C}: C {value}, C# {Constants[i].Cs}");
        }
    }

    [Fact]
    public void ErrorsReadAsGnuTlsWordsThem()
    {
        var e = new GnuTlsException(GnuTls.GNUTLS_E_AGAIN, GnuTlsException.Describe(GnuTls.GNUTLS_E_AGAIN));
        Assert.Equal("Resource temporarily unavailable, try again. (-28)", e.Message);
        Assert.IsAssignableFrom<IOException>(e);
    }
}
