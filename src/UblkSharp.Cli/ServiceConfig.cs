using System.Globalization;
using System.Text.Json;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.Cli;

/// <summary>
/// A device described in a file for a service (`ublksharp run NAME`, `ublksharp@NAME.service`):
/// /etc/ublksharp/NAME.json, or a path. The id is required, so a restarted service finds the
/// device its crashed run left waiting. The target's options are its recipe, as `list --json`
/// prints it ("options"):
/// <code>
/// { "id": 5, "target": "loop", "options": { "file": "/srv/disk.img" },
///   "recovery": "reissue", "queues": 2, "depth": 128, "maxIo": "512K", "autoclear": false,
///   "metrics": "unix:///run/ublksharp-disk.metrics" }
/// </code>
/// </summary>
internal sealed record ServiceConfig(string Path, uint Id, string Target, Dictionary<string, string> Options, RecoveryMode Recovery,
    int Queues, int Depth, int MaxIoBytes, bool Autoclear, string? Metrics)
{
    /// <summary>Where a bare NAME is looked up (UBLKSHARP_CONFIG_DIR overrides it, for tests).</summary>
    public static string Directory =>
        Environment.GetEnvironmentVariable("UBLKSHARP_CONFIG_DIR") is { Length: > 0 } dir ? dir : "/etc/ublksharp";

    private static readonly string[] Members = ["id", "target", "options", "recovery", "queues", "depth", "maxIo", "autoclear", "metrics"];

    /// <summary>The file a NAME (or a path, if it has a '/') names.</summary>
    public static string PathOf(string name)
    {
        if (name.Contains('/', StringComparison.Ordinal))
        {
            return System.IO.Path.GetFullPath(name);
        }
        if (name.Length == 0 || name.StartsWith('.'))
        {
            throw new ArgumentException($"bad device name '{name}': a name is a file name in {Directory} (without .json), or a path");
        }
        return System.IO.Path.Combine(Directory, name + ".json");
    }

    /// <summary>Reads and checks a description; <see cref="ArgumentException"/> says what is wrong and where.</summary>
    public static ServiceConfig Load(string name)
    {
        var path = PathOf(name);
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"{path}: {e.Message}", e);
        }
        try
        {
            return Parse(path, text);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or OverflowException or ArgumentException)
        {
            throw new ArgumentException($"{path}: {e.Message}", e);
        }
    }

    public static ServiceConfig Parse(string path, string text)
    {
        using var doc = JsonDocument.Parse(text, new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        var root = doc.RootElement;
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new JsonException("a device description is a JSON object");
        }
        foreach (var p in root.EnumerateObject())
        {
            if (!Members.Contains(p.Name, StringComparer.Ordinal))
            {
                throw new JsonException($"unknown member '{p.Name}' (known: {string.Join(", ", Members)})");
            }
        }
        if (!root.TryGetProperty("id", out var idElement) || idElement.ValueKind != JsonValueKind.Number)
        {
            throw new JsonException("'id' (a number) is required: a restarted service finds its device by it");
        }
        if (!idElement.TryGetUInt32(out var id) || id >= 1u << 20)
        {
            throw new JsonException($"'id' is a device number from 0 to {(1 << 20) - 1} (the driver's limit), not {idElement.GetRawText()}");
        }
        if (!root.TryGetProperty("target", out var targetElement) || targetElement.GetString() is not { Length: > 0 } target)
        {
            throw new JsonException("'target' is required (null, mem, loop, cow, nbd, rbd, fault)");
        }
        var options = new Dictionary<string, string>(StringComparer.Ordinal);
        if (root.TryGetProperty("options", out var o))
        {
            if (o.ValueKind != JsonValueKind.Object)
            {
                throw new JsonException("'options' is an object of the target's options, as 'ublksharp list --json' prints them");
            }
            foreach (var p in o.EnumerateObject())
            {
                options[p.Name] = p.Value.ValueKind switch
                {
                    JsonValueKind.String => p.Value.GetString()!,
                    JsonValueKind.Number => p.Value.GetRawText(),
                    JsonValueKind.True => "on",
                    JsonValueKind.False => "off",
                    _ => throw new JsonException($"option '{p.Name}' is a string, a number or a boolean"),
                };
            }
        }
        var recovery = RecoveryModes.Parse(root.TryGetProperty("recovery", out var r) ? r.GetString() ?? "off" : "off");
        var queues = root.TryGetProperty("queues", out var q) ? q.GetInt32() : 1;
        var depth = root.TryGetProperty("depth", out var d) ? d.GetInt32() : 128;
        var maxIo = root.TryGetProperty("maxIo", out var m)
            ? (int)Math.Min(int.MaxValue, m.ValueKind == JsonValueKind.Number ? m.GetInt64() : ByteSize.Parse(m.GetString() ?? ""))
            : 512 * 1024;
        var autoclear = root.TryGetProperty("autoclear", out var a) && a.GetBoolean();
        // As add --metrics: loopback or a unix socket only (a description has no --metrics-insecure).
        var metrics = root.TryGetProperty("metrics", out var mt) ? mt.GetString() : null;
        if (metrics is not null)
        {
            _ = MetricsEndpoint.Parse(metrics, insecure: false);
        }
        return new ServiceConfig(path, id, target, options, recovery, queues, depth, maxIo, autoclear, metrics);
    }

    public DeviceOptions DeviceOptions() => new()
    {
        DeviceId = checked((int)Id),
        Queues = Queues,
        Depth = Depth,
        MaxIoBytes = MaxIoBytes,
        Recovery = Recovery,
    };

    public override string ToString() => $"{Path} (device {Id.ToString(CultureInfo.InvariantCulture)}, {Target})";
}
