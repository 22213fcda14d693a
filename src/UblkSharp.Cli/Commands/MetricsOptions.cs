using System.CommandLine;
using UblkSharp.Cli.Logging;

namespace UblkSharp.Cli.Commands;

/// <summary>`--metrics ADDRESS [--metrics-insecure]`, the same for `add` and `serve`: one parse, one loopback rule (<see cref="MetricsEndpoint.Parse"/>).</summary>
internal sealed class MetricsOptions
{
    public Option<string?> Address { get; } = new("--metrics") { Description = "Serve live figures for Prometheus (GET /metrics) at tcp://127.0.0.1:PORT or unix:///PATH" };

    public Option<bool> Insecure { get; } = new("--metrics-insecure") { Description = "Allow --metrics on an address beyond loopback" };

    public void AddTo(Command command)
    {
        command.Options.Add(Address);
        command.Options.Add(Insecure);
    }

    /// <summary>
    /// The --metrics address as given, checked (<see cref="ArgumentException"/> if bad or beyond
    /// loopback without --metrics-insecure), or null; <paramref name="whose"/> names the figures in
    /// the warning --metrics-insecure gives every time.
    /// </summary>
    public string? Checked(ParseResult r, string whose)
    {
        var text = r.GetValue(Address);
        if (text is null)
        {
            return null;
        }
        _ = MetricsEndpoint.Parse(text, r.GetValue(Insecure));
        if (r.GetValue(Insecure))
        {
            CliLog.Warning($"warning: --metrics-insecure: {whose} figures are served beyond loopback at {text}, to anyone who can reach it");
        }
        return text;
    }
}
