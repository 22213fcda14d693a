using System.CommandLine;
using System.Text.Json;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>`ublksharp features`: what the running ublk driver supports (UBLK_U_CMD_GET_FEATURES).</summary>
internal static class FeaturesCommand
{
    public static Command Create()
    {
        var json = new Option<bool>("--json") { Description = "Print JSON instead of a table" };
        var command = new Command("features", "Show the features the running kernel's ublk driver offers") { json };
        command.SetAction(result =>
        {
            using var control = ControlDevice.Open();
            var mask = control.GetFeatures();
            if (result.GetValue(json))
            {
                var names = UblkFeatureNames.Describe(mask).Where(f => f.Present).Select(f => f.Name).ToArray();
                using var stdout = Console.OpenStandardOutput();
                using var writer = new Utf8JsonWriter(stdout, new JsonWriterOptions { Indented = true });
                writer.WriteStartObject();
                writer.WriteString("mask", $"0x{(ulong)mask:x}");
                writer.WriteStartArray("features");
                foreach (var n in names)
                {
                    writer.WriteStringValue(n);
                }
                writer.WriteEndArray();
                writer.WriteEndObject();
                writer.Flush();
                Console.WriteLine();
                return 0;
            }
            Console.WriteLine($"ublk features: 0x{(ulong)mask:x}");
            foreach (var (_, name, since, present) in UblkFeatureNames.Describe(mask))
            {
                Console.WriteLine($"  {(present ? "yes" : "no "),-4} {name,-24} (Linux {since}+)");
            }
            return 0;
        });
        return command;
    }
}
