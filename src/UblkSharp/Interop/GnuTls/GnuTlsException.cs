namespace UblkSharp.Interop.GnuTls;

/// <summary>
/// A GnuTLS call failed; the message is gnutls_strerror's. An IOException, so a connection whose
/// TLS session fails ends like one whose socket does.
/// </summary>
internal sealed class GnuTlsException(int code, string message) : IOException(message)
{
    /// <summary>The GNUTLS_E_* code (negative).</summary>
    public int Code { get; } = code;

    public static unsafe string Describe(int code) => $"{GnuTls.Text(GnuTls.gnutls_strerror(code))} ({code})";

    /// <summary>Throws for a negative result: "<paramref name="what"/>: reason (code)".</summary>
    public static int Check(int result, string what)
        => result < 0 ? throw new GnuTlsException(result, $"{what}: {Describe(result)}") : result;
}
